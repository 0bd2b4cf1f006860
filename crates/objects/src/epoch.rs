//! Dereference scopes: the epoch scheme that keeps a dereferenced object in
//! local memory without touching a per-object counter.
//!
//! A thread that opens a [`Scope`] publishes the global epoch it saw in a
//! per-thread record (one relaxed store and a fence, once per scope, not per
//! dereference). Guards borrow the scope, so the borrow checker ends every
//! guard before its scope. The evictor first unpublishes its victims (a
//! dereference that starts afterwards misses and takes the slow path), then
//! advances the epoch and waits until every thread has either left its scope
//! or entered a newer one ([`synchronize`]): no guard on a victim can be
//! alive after that, so its memory can be written back and reused.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// The global epoch; starts at 1 so that 0 can mean "not in a scope".
static EPOCH: AtomicU64 = AtomicU64::new(1);

/// Every live thread's record.
static RECORDS: Mutex<Vec<Arc<Record>>> = Mutex::new(Vec::new());

#[derive(Debug, Default)]
struct Record {
    /// 0 outside any scope, else the epoch seen when the outermost scope
    /// opened.
    active: AtomicU64,
}

struct Local {
    record: Arc<Record>,
    depth: Cell<u32>,
}

impl Local {
    fn register() -> Local {
        let record = Arc::new(Record::default());
        RECORDS.lock().push(record.clone());
        Local {
            record,
            depth: Cell::new(0),
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.record.active.store(0, Ordering::Release);
        RECORDS.lock().retain(|r| !Arc::ptr_eq(r, &self.record));
    }
}

thread_local! {
    static LOCAL: Local = Local::register();
}

/// A dereference scope: while it lives, objects dereferenced through it stay
/// in local memory. Open one with [`Scope::new`], dereference with
/// `get(&scope)` / `get_mut(&mut scope)`, and keep it short: the evictor
/// waits for scopes that were open when it picked its victims.
///
/// Scopes nest; they are tied to the thread that opened them (not `Send`).
#[derive(Debug)]
pub struct Scope {
    _thread_bound: PhantomData<*const ()>,
}

impl Scope {
    /// Opens a scope on the calling thread.
    #[inline]
    pub fn new() -> Scope {
        LOCAL.with(|l| {
            let d = l.depth.get();
            if d == 0 {
                l.record
                    .active
                    .store(EPOCH.load(Ordering::Relaxed), Ordering::Relaxed);
                // Orders the publication above before every load of an
                // object's state made inside the scope (see `synchronize`).
                fence(Ordering::SeqCst);
            }
            l.depth.set(d + 1);
        });
        Scope {
            _thread_bound: PhantomData,
        }
    }
}

impl Default for Scope {
    fn default() -> Self {
        Scope::new()
    }
}

impl Drop for Scope {
    #[inline]
    fn drop(&mut self) {
        // `try_with`: a scope dropped during thread teardown after the
        // record is gone has nothing left to unpublish.
        let _ = LOCAL.try_with(|l| {
            let d = l.depth.get() - 1;
            l.depth.set(d);
            if d == 0 {
                // Release: everything done through the scope's guards
                // happens before the evictor sees the thread leave.
                l.record.active.store(0, Ordering::Release);
            }
        });
    }
}

/// True if the calling thread has a scope open.
pub fn in_scope() -> bool {
    LOCAL.try_with(|l| l.depth.get() > 0).unwrap_or(false)
}

/// Waits until no scope opened before this call is still open. Call it
/// after unpublishing objects (SeqCst state changes): afterwards no guard on
/// them exists, and none can be created without going through the slow path.
///
/// Must not be called with a scope open on the calling thread (it would
/// wait for itself).
pub fn synchronize() {
    debug_assert!(!in_scope(), "synchronize inside a scope");
    fence(Ordering::SeqCst);
    let next = EPOCH.fetch_add(1, Ordering::SeqCst) + 1;
    let records: Vec<Arc<Record>> = RECORDS.lock().clone();
    for r in records {
        let mut spins = 0u32;
        loop {
            let a = r.active.load(Ordering::Acquire);
            if a == 0 || a >= next {
                break;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else if spins < 256 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[test]
    fn nested_scopes_publish_once() {
        assert!(!in_scope());
        let a = Scope::new();
        let b = Scope::new();
        assert!(in_scope());
        drop(b);
        assert!(in_scope());
        drop(a);
        assert!(!in_scope());
        synchronize();
    }

    #[test]
    fn synchronize_waits_for_an_open_scope() {
        let opened = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicBool::new(false));
        let (o, c) = (opened.clone(), closed.clone());
        let t = std::thread::spawn(move || {
            let s = Scope::new();
            o.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            c.store(true, Ordering::SeqCst);
            drop(s);
        });
        while !opened.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        synchronize();
        assert!(
            closed.load(Ordering::SeqCst),
            "returned while a scope was open"
        );
        t.join().unwrap();
    }

    #[test]
    fn scopes_opened_later_do_not_hold_up_synchronize() {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        // A thread that keeps opening fresh short scopes never blocks.
        let t = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                let _s = Scope::new();
            }
        });
        for _ in 0..100 {
            synchronize();
        }
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }
}
