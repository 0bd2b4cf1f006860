//! Coordination between clients that share a region: a mutex and a barrier,
//! built on the memory servers' compare-and-swap and fetch-and-add.
//!
//! Remora keeps no coherence between cached copies; these primitives order
//! the accesses of clients to shared far data. Both spin on the server with
//! exponential backoff (1 µs doubling to 1 ms), so a waiting client costs
//! the server at most about a thousand small requests a second.

use std::time::Duration;

use crate::{ClientError, Region, Result};

fn backoff(step: &mut u32) {
    let us = 1u64 << (*step).min(10);
    *step += 1;
    std::thread::sleep(Duration::from_micros(us));
}

fn owner_token() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

/// A distributed mutex: the 8-byte word at `offset` holds 0 when free and the
/// holder's random token when held.
///
/// Not reentrant. A client that dies while holding the lock leaves it held
/// (there is no lease); [`FarMutex::force_unlock`] clears it.
#[derive(Debug, Clone, Copy)]
pub struct FarMutex<'r> {
    region: &'r Region,
    offset: u64,
}

impl<'r> FarMutex<'r> {
    pub(crate) fn new(region: &'r Region, offset: u64) -> Self {
        FarMutex { region, offset }
    }

    /// Blocks until the lock is taken.
    pub fn lock(&self) -> Result<FarMutexGuard<'r>> {
        let token = owner_token();
        let mut step = 0;
        loop {
            if self.region.compare_and_swap(self.offset, 0, token)? == 0 {
                return Ok(FarMutexGuard {
                    mutex: *self,
                    token,
                    released: false,
                });
            }
            backoff(&mut step);
        }
    }

    /// Takes the lock if it is free.
    pub fn try_lock(&self) -> Result<Option<FarMutexGuard<'r>>> {
        let token = owner_token();
        if self.region.compare_and_swap(self.offset, 0, token)? == 0 {
            Ok(Some(FarMutexGuard {
                mutex: *self,
                token,
                released: false,
            }))
        } else {
            Ok(None)
        }
    }

    /// Clears the lock whoever holds it (recovery after a holder died).
    pub fn force_unlock(&self) -> Result<()> {
        let mut cur = self.region.fetch_add(self.offset, 0)?;
        while cur != 0 {
            cur = match self.region.compare_and_swap(self.offset, cur, 0)? {
                prev if prev == cur => 0,
                prev => prev,
            };
        }
        Ok(())
    }
}

/// Holds a [`FarMutex`]; unlocks on drop (errors on drop are logged).
#[derive(Debug)]
pub struct FarMutexGuard<'r> {
    mutex: FarMutex<'r>,
    token: u64,
    released: bool,
}

impl FarMutexGuard<'_> {
    /// Unlocks, reporting failure (the lock was lost or the server is gone).
    pub fn unlock(mut self) -> Result<()> {
        self.released = true;
        self.release()
    }

    fn release(&self) -> Result<()> {
        let m = &self.mutex;
        let prev = m.region.compare_and_swap(m.offset, self.token, 0)?;
        if prev != self.token {
            return Err(ClientError::Protocol {
                addr: format!("region {}", m.region.id()),
                detail: format!("mutex at offset {} was not held by this guard", m.offset),
            });
        }
        Ok(())
    }
}

impl Drop for FarMutexGuard<'_> {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.release() {
                tracing::warn!("unlocking far mutex: {e}");
            }
        }
    }
}

/// A reusable barrier for `parties` clients: the word at `offset` counts
/// arrivals, the word at `offset + 8` is the generation.
///
/// Each arrival reads the generation, then increments the count; the last
/// one resets the count (subtracting `parties`, so it never races with the
/// next round) and then bumps the generation, which releases the others.
#[derive(Debug, Clone, Copy)]
pub struct FarBarrier<'r> {
    region: &'r Region,
    offset: u64,
    parties: u64,
}

impl<'r> FarBarrier<'r> {
    pub(crate) fn new(region: &'r Region, offset: u64, parties: u64) -> Self {
        FarBarrier {
            region,
            offset,
            parties: parties.max(1),
        }
    }

    /// Blocks until `parties` clients have called `wait`; returns true for exactly one of them.
    pub fn wait(&self) -> Result<bool> {
        let r = self.region;
        let gen = r.fetch_add(self.offset + 8, 0)?;
        let arrived = r.fetch_add(self.offset, 1)?.wrapping_add(1);
        if arrived == self.parties {
            r.fetch_add(self.offset, self.parties.wrapping_neg())?;
            r.fetch_add(self.offset + 8, 1)?;
            return Ok(true);
        }
        let mut step = 0;
        while r.fetch_add(self.offset + 8, 0)? == gen {
            backoff(&mut step);
        }
        Ok(false)
    }
}
