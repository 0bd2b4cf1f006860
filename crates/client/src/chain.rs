//! The backup side of replicated atomics.
//!
//! The primary copy of a word orders its atomics; every other copy must go
//! through the same transitions in the same order. [`follow`] moves one
//! backup through the transition `old → new` that one atomic made at the
//! primary: a compare-and-swap from `old` succeeds exactly when the backup
//! has taken every earlier transition, so a backup that lags (an earlier
//! atomic from another thread or client is still on its way) is waited
//! for. A backup left behind for good (a client died between the primary
//! and its backups) is set to the primary's current value once patience
//! runs out.
//!
//! Written against [`WordCopy`] so that the same code runs over the network
//! (`redundant.rs`) and over a model under a randomized scheduler
//! (`tests/model.rs`).

use crate::Result;

/// One backup copy of a replicated word, with access to the primary.
pub trait WordCopy {
    /// Compare-and-swap on the backup; returns the value it held.
    fn cas(&mut self, expected: u64, new: u64) -> Result<u64>;
    /// The primary's current value.
    fn primary(&mut self) -> Result<u64>;
    /// True once the backup has lagged long enough to be repaired.
    fn patience_exhausted(&mut self) -> bool;
    /// Waits a little before trying again.
    fn pause(&mut self);
}

/// How [`follow`] brought the backup up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followed {
    /// The backup took the transition.
    Applied,
    /// The backup lagged too long and was set to the primary's value.
    Repaired,
}

/// Moves a backup through the primary's transition `old → new`.
pub fn follow(c: &mut impl WordCopy, old: u64, new: u64) -> Result<Followed> {
    loop {
        let seen = c.cas(old, new)?;
        if seen == old {
            return Ok(Followed::Applied);
        }
        if c.patience_exhausted() {
            let now = c.primary()?;
            if c.cas(seen, now)? == seen {
                return Ok(Followed::Repaired);
            }
            // The backup moved meanwhile: look again.
            continue;
        }
        c.pause();
    }
}
