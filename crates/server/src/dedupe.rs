//! At-most-once operations: the outcome of each atomic or parity XOR that
//! carries a request id, remembered per client session, so that a retry
//! (after a lost reply or a reconnect) returns the first outcome instead of
//! applying it again.
//!
//! The table is sharded by (session, request id), so that unrelated
//! requests do not wait for each other, and bounded: each shard keeps its
//! most recent outcomes and forgets the oldest first, [`CAPACITY`] in all.
//! A client resends within its failover timeout (10 s by default); an
//! entry lives until a million later at-most-once operations on this server
//! pushed it out, about 10 s at 100 000 per second, more than a server
//! thread per connection sustains for one region's atomics and parity
//! updates. A resend after that would be applied again.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

use parking_lot::{Mutex, MutexGuard};

/// Outcomes remembered over all shards (about 80 bytes each with the
/// table's overhead: 80 MiB at most).
pub const CAPACITY: usize = 1 << 20;
const SHARDS: usize = 64;

/// One shard: recent outcomes by (session, request id), oldest first.
#[derive(Debug, Default)]
pub struct Shard {
    done: HashMap<(u64, u64), u64>,
    order: VecDeque<(u64, u64)>,
}

impl Shard {
    /// The outcome of `(session, rid)`, if it was applied.
    pub fn get(&self, session: u64, rid: u64) -> Option<u64> {
        self.done.get(&(session, rid)).copied()
    }

    /// Records the outcome of `(session, rid)`.
    pub fn put(&mut self, session: u64, rid: u64, value: u64) {
        if self.done.insert((session, rid), value).is_none() {
            self.order.push_back((session, rid));
            while self.order.len() > CAPACITY / SHARDS {
                if let Some(old) = self.order.pop_front() {
                    self.done.remove(&old);
                }
            }
        }
    }
}

/// Recent outcomes by (session, request id).
#[derive(Debug)]
pub struct Dedupe {
    shards: Vec<Mutex<Shard>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Dedupe {
    fn default() -> Self {
        Dedupe {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
        }
    }
}

impl Dedupe {
    /// The shard that owns `(session, rid)`, locked. Holding it across the
    /// check and the apply makes two racing resends apply once.
    pub fn shard(&self, session: u64, rid: u64) -> MutexGuard<'_, Shard> {
        let h = self.hasher.hash_one((session, rid));
        self.shards[h as usize % SHARDS].lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The protocol document states the table's size as the code has it.
    #[test]
    fn the_protocol_document_gives_this_capacity() {
        let doc = include_str!("../../../docs/protocol.md");
        let digits: String = CAPACITY
            .to_string()
            .as_bytes()
            .rchunks(3)
            .rev()
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            doc.contains(&format!("the last {digits} ")),
            "docs/protocol.md must give the at-most-once table as {digits}"
        );
        assert!(doc.contains(&format!("{} shards of", SHARDS)));
        let per = (CAPACITY / SHARDS).to_string();
        let per = format!("{} {}", &per[..per.len() - 3], &per[per.len() - 3..]);
        assert!(doc.contains(&format!("of {per} each")));
    }

    #[test]
    fn remembers_and_forgets_oldest() {
        let d = Dedupe::default();
        d.shard(1, 1).put(1, 1, 10);
        assert_eq!(d.shard(1, 1).get(1, 1), Some(10));
        assert_eq!(d.shard(2, 1).get(2, 1), None);
        for i in 0..CAPACITY as u64 * 2 {
            d.shard(2, i + 2).put(2, i + 2, i);
        }
        assert_eq!(d.shard(1, 1).get(1, 1), None);
        let kept: usize = d.shards.iter().map(|s| s.lock().done.len()).sum();
        assert!(kept <= CAPACITY, "{kept}");
        let last = CAPACITY as u64 * 2 + 1;
        assert_eq!(d.shard(2, last).get(2, last), Some(last - 2));
    }
}
