//! Coordination between clients that share a region: a mutex and a barrier,
//! built on the memory servers' compare-and-swap and fetch-and-add.
//!
//! Remora keeps no coherence between cached copies; these primitives order
//! the accesses of clients to shared far data. Both spin on the server with
//! exponential backoff (1 µs doubling to 1 ms), so a waiting client costs
//! the server at most about a thousand small requests a second.
//!
//! The algorithms are written against [`FarWords`] (the two atomics they
//! need), which [`Region`] implements; the model-checking tests
//! (`tests/model.rs`) run the same code over a model of the server's words
//! under every interleaving a randomized scheduler finds.

use std::time::Duration;

use crate::{ClientError, Region, Result};

/// The far-memory atomics the coordination algorithms are built on.
pub trait FarWords {
    /// Compare-and-swap on the word at `offset`; returns the previous value.
    fn cas(&self, offset: u64, expected: u64, new: u64) -> Result<u64>;
    /// Fetch-and-add on the word at `offset`; returns the previous value.
    fn faa(&self, offset: u64, delta: u64) -> Result<u64>;
    /// Waits before polling again; `step` counts the polls so far.
    fn pause(&self, step: &mut u32) {
        let us = 1u64 << (*step).min(10);
        *step += 1;
        std::thread::sleep(Duration::from_micros(us));
    }
    /// A name for error messages.
    fn describe(&self) -> String;
}

impl FarWords for Region {
    fn cas(&self, offset: u64, expected: u64, new: u64) -> Result<u64> {
        self.compare_and_swap(offset, expected, new)
    }

    fn faa(&self, offset: u64, delta: u64) -> Result<u64> {
        self.fetch_add(offset, delta)
    }

    fn describe(&self) -> String {
        format!("region {}", self.id())
    }
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
#[derive(Debug)]
pub struct FarMutex<'r, W: FarWords + ?Sized = Region> {
    words: &'r W,
    offset: u64,
}

impl<W: FarWords + ?Sized> Clone for FarMutex<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W: FarWords + ?Sized> Copy for FarMutex<'_, W> {}

impl<'r, W: FarWords + ?Sized> FarMutex<'r, W> {
    /// A mutex on the word at `offset` of `words` (initially 0).
    pub fn new(words: &'r W, offset: u64) -> Self {
        FarMutex { words, offset }
    }

    /// Blocks until the lock is taken.
    pub fn lock(&self) -> Result<FarMutexGuard<'r, W>> {
        let token = owner_token();
        let mut step = 0;
        loop {
            if self.words.cas(self.offset, 0, token)? == 0 {
                return Ok(FarMutexGuard {
                    mutex: *self,
                    token,
                    released: false,
                });
            }
            self.words.pause(&mut step);
        }
    }

    /// Takes the lock if it is free.
    pub fn try_lock(&self) -> Result<Option<FarMutexGuard<'r, W>>> {
        let token = owner_token();
        if self.words.cas(self.offset, 0, token)? == 0 {
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
        let mut cur = self.words.faa(self.offset, 0)?;
        while cur != 0 {
            let prev = self.words.cas(self.offset, cur, 0)?;
            cur = if prev == cur { 0 } else { prev };
        }
        Ok(())
    }
}

/// Holds a [`FarMutex`]; unlocks on drop (errors on drop are logged).
#[derive(Debug)]
pub struct FarMutexGuard<'r, W: FarWords + ?Sized = Region> {
    mutex: FarMutex<'r, W>,
    token: u64,
    released: bool,
}

impl<W: FarWords + ?Sized> FarMutexGuard<'_, W> {
    /// Unlocks, reporting failure (the lock was lost or the server is gone).
    pub fn unlock(mut self) -> Result<()> {
        self.released = true;
        self.release()
    }

    fn release(&self) -> Result<()> {
        let m = &self.mutex;
        let prev = m.words.cas(m.offset, self.token, 0)?;
        if prev != self.token {
            return Err(ClientError::Protocol {
                addr: m.words.describe(),
                detail: format!("mutex at offset {} was not held by this guard", m.offset),
            });
        }
        Ok(())
    }
}

impl<W: FarWords + ?Sized> Drop for FarMutexGuard<'_, W> {
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
#[derive(Debug)]
pub struct FarBarrier<'r, W: FarWords + ?Sized = Region> {
    words: &'r W,
    offset: u64,
    parties: u64,
}

impl<W: FarWords + ?Sized> Clone for FarBarrier<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W: FarWords + ?Sized> Copy for FarBarrier<'_, W> {}

impl<'r, W: FarWords + ?Sized> FarBarrier<'r, W> {
    /// A barrier on the words at `offset` and `offset + 8` (initially 0).
    pub fn new(words: &'r W, offset: u64, parties: u64) -> Self {
        FarBarrier {
            words,
            offset,
            parties: parties.max(1),
        }
    }

    /// Blocks until `parties` clients have called `wait`; returns true for exactly one of them.
    pub fn wait(&self) -> Result<bool> {
        let w = self.words;
        let gen = w.faa(self.offset + 8, 0)?;
        let arrived = w.faa(self.offset, 1)?.wrapping_add(1);
        if arrived == self.parties {
            w.faa(self.offset, self.parties.wrapping_neg())?;
            w.faa(self.offset + 8, 1)?;
            return Ok(true);
        }
        let mut step = 0;
        while w.faa(self.offset + 8, 0)? == gen {
            w.pause(&mut step);
        }
        Ok(false)
    }
}
