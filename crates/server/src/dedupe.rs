//! At-most-once atomics: the outcome of each atomic that carries a request
//! id, remembered per client session, so that a retry (after a lost reply or
//! a reconnect) returns the first outcome instead of applying it again.
//!
//! The table is bounded: it keeps the most recent [`CAPACITY`] outcomes over
//! all sessions and forgets the oldest first. A client retries within its
//! request timeout (seconds), far sooner than that many later atomics push
//! an entry out.

use std::collections::{HashMap, VecDeque};

/// Outcomes remembered (about 40 bytes each).
pub const CAPACITY: usize = 1 << 16;

/// Recent atomic outcomes by (session, request id).
#[derive(Debug, Default)]
pub struct Dedupe {
    done: HashMap<(u64, u64), u64>,
    order: VecDeque<(u64, u64)>,
}

impl Dedupe {
    /// The outcome of `(session, rid)`, if it was applied.
    pub fn get(&self, session: u64, rid: u64) -> Option<u64> {
        self.done.get(&(session, rid)).copied()
    }

    /// Records the outcome of `(session, rid)`.
    pub fn put(&mut self, session: u64, rid: u64, value: u64) {
        if self.done.insert((session, rid), value).is_none() {
            self.order.push_back((session, rid));
            while self.order.len() > CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.done.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_forgets_oldest() {
        let mut d = Dedupe::default();
        d.put(1, 1, 10);
        assert_eq!(d.get(1, 1), Some(10));
        assert_eq!(d.get(2, 1), None);
        for i in 0..CAPACITY as u64 {
            d.put(2, i + 2, i);
        }
        assert_eq!(d.get(1, 1), None);
        assert_eq!(d.get(2, 2), Some(0));
        assert_eq!(d.done.len(), CAPACITY);
    }
}
