//! `remora region ...`: the administrator's tool for far memory.
//!
//! Reads and writes stream in 1 MiB chunks with several chunks in flight, so
//! large files move at pipeline speed rather than one round trip per chunk.

use std::collections::VecDeque;
use std::io::{Read, Write};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use remora_client::Redundancy;
use remora_client::RegionSummary;
use remora_proto::ctl::ServerInfo;
use remora_proto::size::Bytes;

use crate::{size_arg, ClientArgs};

const CHUNK: usize = 1 << 20;
const IN_FLIGHT: usize = 8;

#[derive(Subcommand, Debug)]
pub enum RegionCmd {
    /// Allocate a named region.
    Create {
        /// Region name.
        name: String,
        /// Size (e.g. 64MiB, 1GiB).
        #[arg(long, value_parser = size_arg)]
        size: u64,
        /// How the region survives the loss of servers: none,
        /// replicate:N (N copies), or erasure:K+M (Reed-Solomon, K data and
        /// M parity slabs per stripe; M servers may be lost).
        #[arg(long, default_value = "none")]
        redundancy: Redundancy,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Write standard input into a region.
    Write {
        /// Region name.
        name: String,
        /// Byte offset to start at (sizes like 4KiB accepted).
        #[arg(long, default_value = "0", value_parser = size_arg)]
        offset: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Read a region to standard output.
    Read {
        /// Region name.
        name: String,
        /// Byte offset to start at.
        #[arg(long, default_value = "0", value_parser = size_arg)]
        offset: u64,
        /// Bytes to read (default: to the end of the region).
        #[arg(long, value_parser = size_arg)]
        len: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the tenant's regions.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Move one slab of a region to another server (rebalancing, draining a server).
    Move {
        /// Region name.
        name: String,
        /// Index of the slab in the region (see `remora region show`).
        #[arg(long)]
        slab: u64,
        /// Destination server address (default: chosen by placement).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show where each slab of a region lives.
    Show {
        /// Region name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Free a region.
    Rm {
        /// Region name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub fn run(cmd: RegionCmd) -> Result<()> {
    match cmd {
        RegionCmd::Create {
            name,
            size,
            redundancy,
            client,
        } => {
            let c = client.connect()?;
            let r = c
                .alloc_with(size, Some(&name), redundancy)
                .with_context(|| format!("creating region {name:?}"))?;
            let m = r.map();
            outln!(
                "created region {name} (id {}, {}, {redundancy}, {} slabs)",
                r.id(),
                Bytes(r.size()),
                m.slabs.len() + m.extra.len()
            );
            Ok(())
        }
        RegionCmd::Write {
            name,
            offset,
            client,
        } => {
            let (_, r) = open(&client, &name)?;
            let mut input = std::io::stdin().lock();
            let mut pos = offset;
            let mut inflight = VecDeque::new();
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = read_full(&mut input, &mut buf).context("reading standard input")?;
                if n == 0 {
                    break;
                }
                if pos + n as u64 > r.size() {
                    bail!(
                        "input does not fit: region {name:?} is {} bytes, input reaches offset {}",
                        r.size(),
                        pos + n as u64
                    );
                }
                if r.redundancy() != Redundancy::None {
                    // Failover and parity updates run in the blocking form.
                    r.write(pos, &buf[..n])?;
                    pos += n as u64;
                    continue;
                }
                if inflight.len() >= IN_FLIGHT {
                    let f: remora_client::OpFuture<()> = inflight.pop_front().context("queue")?;
                    f.wait()?;
                }
                inflight.push_back(r.write_async(pos, &buf[..n]));
                pos += n as u64;
            }
            for f in inflight {
                f.wait()?;
            }
            eprintln!("wrote {} to {name} at offset {offset}", Bytes(pos - offset));
            Ok(())
        }
        RegionCmd::Read {
            name,
            offset,
            len,
            client,
        } => {
            let (_, r) = open(&client, &name)?;
            if offset > r.size() {
                bail!(
                    "offset {offset} is past the end of region {name:?} ({} bytes)",
                    r.size()
                );
            }
            let len = len.unwrap_or(r.size() - offset);
            if offset + len > r.size() {
                bail!(
                    "range [{offset}, {}) is past the end of region {name:?} ({} bytes)",
                    offset + len,
                    r.size()
                );
            }
            let mut out = std::io::stdout().lock();
            let mut next = offset;
            let end = offset + len;
            if r.redundancy() != Redundancy::None {
                let mut buf = vec![0u8; CHUNK];
                while next < end {
                    let n = (end - next).min(CHUNK as u64) as usize;
                    r.read(next, &mut buf[..n])?;
                    out.write_all(&buf[..n])
                        .context("writing standard output")?;
                    next += n as u64;
                }
                out.flush().context("writing standard output")?;
                return Ok(());
            }
            let mut inflight = VecDeque::new();
            while next < end || !inflight.is_empty() {
                while next < end && inflight.len() < IN_FLIGHT {
                    let n = (end - next).min(CHUNK as u64) as usize;
                    inflight.push_back(r.read_async(next, n));
                    next += n as u64;
                }
                if let Some(f) = inflight.pop_front() {
                    let data = f.wait()?;
                    out.write_all(&data).context("writing standard output")?;
                }
            }
            out.flush().context("writing standard output")?;
            Ok(())
        }
        RegionCmd::List { client } => {
            let c = client.connect()?;
            print_regions(&c.list_regions()?);
            Ok(())
        }
        RegionCmd::Move {
            name,
            slab,
            to,
            client,
        } => {
            let (c, r) = open(&client, &name)?;
            let from = r
                .map()
                .pieces()
                .nth(slab as usize)
                .map(|s| s.addr.clone())
                .unwrap_or_default();
            let m = c
                .move_slab(r.id(), slab, to.as_deref())
                .with_context(|| format!("moving slab {slab} of region {name:?}"))?;
            let dest = m
                .pieces()
                .nth(slab as usize)
                .map(|s| s.addr.clone())
                .unwrap_or_default();
            outln!(
                "moved slab {slab} of {name} from {from} to {dest} (map version {})",
                m.version
            );
            Ok(())
        }
        RegionCmd::Show { name, client } => {
            let (c, r) = open(&client, &name)?;
            let m = r.map();
            // The servers as the controller sees them now: a piece on a
            // server it is waiting for, or one declared dead whose map
            // change this map predates, is not ok.
            let servers: Option<std::collections::HashMap<u64, ServerInfo>> = match c.status() {
                Ok(s) => Some(s.servers.into_iter().map(|sv| (sv.id, sv)).collect()),
                Err(e) => {
                    eprintln!("server states unknown ({e}): showing the map only");
                    None
                }
            };
            outln!(
                "region {name} (id {}): {}, {}, {} data + {} redundant slabs of {}, map version {}",
                m.id,
                Bytes(m.size),
                m.redundancy,
                m.slabs.len(),
                m.extra.len(),
                Bytes(m.slab_size),
                m.version
            );
            outln!(
                "{:>6} {:<10} {:>14} {:<22} {}",
                "SLAB",
                "ROLE",
                "OFFSET",
                "SERVER",
                "STATE"
            );
            for (i, s) in m.pieces().enumerate() {
                let (role, offset) = piece_role(&m, i);
                outln!(
                    "{:>6} {:<10} {:>14} {:<22} {}",
                    i,
                    role,
                    offset.map_or("-".to_string(), |o| o.to_string()),
                    s.addr,
                    piece_state(s, servers.as_ref().map(|m| m.get(&s.server_id)))
                );
            }
            let lost = m.pieces().filter(|s| s.lost).count();
            let at_risk = servers.as_ref().map_or(0, |sv| {
                m.pieces()
                    .filter(|s| !s.lost && !sv.get(&s.server_id).is_some_and(|sv| sv.alive))
                    .count()
            });
            if lost > 0 || at_risk > 0 {
                outln!("NOT HEALTHY: {lost} slabs lost, {at_risk} at risk");
            }
            Ok(())
        }
        RegionCmd::Rm { name, client } => {
            let (c, r) = open(&client, &name)?;
            c.free_region(r.id())?;
            outln!("removed region {name}");
            Ok(())
        }
    }
}

/// Connects and opens the tenant's region `name`.
fn open(
    client: &ClientArgs,
    name: &str,
) -> Result<(remora_client::Cluster, remora_client::Region)> {
    let c = client.connect()?;
    let r = c
        .open_region(name)
        .with_context(|| format!("opening region {name:?}"))?;
    Ok((c, r))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A server's state as `remora status` shows it.
pub fn server_state(sv: &ServerInfo) -> String {
    if sv.alive {
        "alive".to_string()
    } else if sv.waiting {
        format!("waiting ({}s)", sv.last_seen_ms / 1000)
    } else {
        format!("dead {}s", sv.last_seen_ms / 1000)
    }
}

/// A piece's state in `remora region show`: lost, at risk on a server that
/// is not serving (the controller is waiting for it, or declared it dead),
/// or ok.
/// `server` is `None` when the server states are unknown (the map alone
/// then decides).
fn piece_state(s: &remora_proto::ctl::SlabLoc, server: Option<Option<&ServerInfo>>) -> String {
    if s.lost {
        return "LOST".into();
    }
    match server {
        Some(Some(sv)) if sv.alive => {}
        Some(Some(sv)) => return format!("at risk: server {}", server_state(sv)),
        Some(None) => return "at risk: server unknown".into(),
        None => {}
    }
    if s.restored {
        "ok (rebuilt)".into()
    } else {
        "ok".into()
    }
}

/// What piece `i` of a map is, and the region offset of its bytes.
fn piece_role(m: &remora_proto::ctl::RegionMap, i: usize) -> (String, Option<u64>) {
    let n = m.slabs.len();
    if i < n {
        return ("data".into(), Some(i as u64 * m.slab_size));
    }
    let j = i - n;
    match m.redundancy {
        Redundancy::Replicate(c) => {
            let slab = j / (c as usize - 1).max(1);
            (format!("copy:{slab}"), Some(slab as u64 * m.slab_size))
        }
        Redundancy::Erasure { parity, .. } => {
            (format!("parity:{}", j / parity.max(1) as usize), None)
        }
        Redundancy::None => ("?".into(), None),
    }
}

pub fn print_regions(regions: &[RegionSummary]) {
    outln!("REGIONS");
    outln!(
        "{:<6} {:<24} {:<12} {:>10} {:<14} {:>7} {:>8}",
        "ID",
        "NAME",
        "TENANT",
        "SIZE",
        "REDUNDANCY",
        "SLABS",
        "VERSION"
    );
    for r in regions {
        let slabs = match (r.lost, r.at_risk) {
            (0, 0) => r.pieces.to_string(),
            (lost, 0) => format!("{} ({lost} lost)", r.pieces),
            (0, risk) => format!("{} ({risk} at risk)", r.pieces),
            (lost, risk) => format!("{} ({lost} lost, {risk} at risk)", r.pieces),
        };
        outln!(
            "{:<6} {:<24} {:<12} {:>10} {:<14} {:>7} {:>8}",
            r.id,
            r.name.as_deref().unwrap_or("-"),
            r.tenant,
            Bytes(r.size).to_string(),
            r.redundancy.to_string(),
            slabs,
            r.version
        );
    }
}
