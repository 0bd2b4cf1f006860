//! What a peer may make the server hold: connection slots and buffer bytes.
//!
//! A memory server holds other tenants' data, so no peer may take a lock,
//! a thread or memory that others need. This module owns the two limited
//! resources that connections take:
//!
//! * **Connection slots.** A connection starts *pending*: it has not shaken
//!   hands, or it shook hands without a credential (such a connection may
//!   only ask for statistics). Pending connections have their own small
//!   limit and must be done within a deadline from accept, so idle or
//!   trickling strangers never take the slots of authenticated clients.
//!   A handshake that presents a slab capability makes the connection its
//!   owner's: it then counts against the server's connection limit and its
//!   tenant's limit. The controller's admin connections count against
//!   neither (there are a handful, and it must always get in).
//! * **Buffer bytes.** Every byte a connection buffers beyond a small base
//!   (a partly received frame, replies waiting to be sent) is charged to one
//!   server-wide [`Budget`] *before* it is allocated. A charge that does not
//!   fit is refused: the request gets `ErrorCode::Overloaded`
//!   (or, for a frame that could not be received, the connection is closed
//!   with it), and nothing is applied.
//!
//! Both are plain atomics and a small map behind a mutex that is held only
//! to count; nothing here blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

/// A server-wide limit on bytes held in connection buffers.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Budget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges `n` bytes if they fit under the limit.
    #[must_use]
    pub fn try_charge(&self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    /// Charges `n` bytes whatever the limit (memory already held that a
    /// charge missed; it only makes later charges fail sooner).
    pub fn force(&self, n: usize) {
        self.used.fetch_add(n, Ordering::AcqRel);
    }

    /// Gives back `n` bytes charged earlier.
    pub fn release(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

/// Connection limits (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Authenticated client connections at once.
    pub max_connections: usize,
    /// Authenticated connections of one tenant at once.
    pub max_per_tenant: usize,
    /// Connections that have not authenticated, at once.
    pub max_pending: usize,
}

/// Connection slots in use.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    pending: AtomicUsize,
    clients: AtomicUsize,
    admins: AtomicUsize,
    tenants: Mutex<HashMap<u64, usize>>,
    /// The buffer budget.
    pub budget: Budget,
}

/// The slot a connection holds; given back when dropped.
#[derive(Debug)]
pub enum Ticket<'a> {
    /// Not authenticated (before or without a credential).
    Pending(&'a Admission),
    /// A tenant's client, by owner tag.
    Client(&'a Admission, u64),
    /// The controller.
    Admin(&'a Admission),
}

impl Admission {
    /// Empty slots under `limits`, with a buffer budget of `budget` bytes.
    pub fn new(limits: Limits, budget: usize) -> Self {
        Admission {
            limits,
            pending: AtomicUsize::new(0),
            clients: AtomicUsize::new(0),
            admins: AtomicUsize::new(0),
            tenants: Mutex::new(HashMap::new()),
            budget: Budget::new(budget),
        }
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A pending slot for a connection just accepted, if one is free.
    pub fn accept(&self) -> Option<Ticket<'_>> {
        self.pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limits.max_pending).then_some(n + 1)
            })
            .ok()
            .map(|_| Ticket::Pending(self))
    }

    /// Connections open now: (pending, clients, admin).
    pub fn open(&self) -> (usize, usize, usize) {
        (
            self.pending.load(Ordering::Relaxed),
            self.clients.load(Ordering::Relaxed),
            self.admins.load(Ordering::Relaxed),
        )
    }

    /// Authenticated connections of the tenant tagged `owner`.
    pub fn tenant_connections(&self, owner: u64) -> usize {
        self.tenants.lock().get(&owner).copied().unwrap_or(0)
    }
}

impl<'a> Ticket<'a> {
    fn admission(&self) -> &'a Admission {
        match *self {
            Ticket::Pending(a) | Ticket::Client(a, _) | Ticket::Admin(a) => a,
        }
    }

    /// True until the connection authenticated.
    pub fn is_pending(&self) -> bool {
        matches!(self, Ticket::Pending(_))
    }

    /// Moves a pending connection to the admin slots.
    pub fn promote_admin(&mut self) {
        let a = self.admission();
        if self.is_pending() {
            a.admins.fetch_add(1, Ordering::AcqRel);
            // The pending ticket replaced here gives its slot back as it drops.
            *self = Ticket::Admin(a);
        }
    }

    /// Moves a pending connection to a client slot of tenant `owner`, if
    /// the server and the tenant are under their limits; otherwise it stays
    /// pending and the error says which limit was hit.
    pub fn promote_client(&mut self, owner: u64) -> Result<(), String> {
        let a = self.admission();
        if !self.is_pending() {
            return Ok(());
        }
        let mut tenants = a.tenants.lock();
        let mine = tenants.get(&owner).copied().unwrap_or(0);
        if mine >= a.limits.max_per_tenant {
            return Err(format!(
                "this tenant already has {mine} connections to this server (the limit per tenant)"
            ));
        }
        if a.clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < a.limits.max_connections).then_some(n + 1)
            })
            .is_err()
        {
            return Err(format!(
                "the server has {} client connections (its limit)",
                a.limits.max_connections
            ));
        }
        *tenants.entry(owner).or_insert(0) += 1;
        drop(tenants);
        // The pending ticket replaced here gives its slot back as it drops.
        *self = Ticket::Client(a, owner);
        Ok(())
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        match *self {
            Ticket::Pending(a) => {
                a.pending.fetch_sub(1, Ordering::AcqRel);
            }
            Ticket::Admin(a) => {
                a.admins.fetch_sub(1, Ordering::AcqRel);
            }
            Ticket::Client(a, owner) => {
                a.clients.fetch_sub(1, Ordering::AcqRel);
                let mut t = a.tenants.lock();
                if let Some(n) = t.get_mut(&owner) {
                    *n -= 1;
                    if *n == 0 {
                        t.remove(&owner);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_never_exceeds_its_limit() {
        let b = std::sync::Arc::new(Budget::new(1000));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if b.try_charge(300) {
                            assert!(b.used() <= 1000);
                            b.release(300);
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(b.used(), 0);
        assert!(b.try_charge(1000));
        assert!(!b.try_charge(1));
        assert!(b.try_charge(0));
    }

    #[test]
    fn slots_by_kind_and_tenant() {
        let a = Admission::new(
            Limits {
                max_connections: 3,
                max_per_tenant: 2,
                max_pending: 2,
            },
            0,
        );
        let mut t1 = a.accept().unwrap();
        let mut t2 = a.accept().unwrap();
        assert!(a.accept().is_none(), "pending slots are limited");
        t1.promote_client(7).unwrap();
        t2.promote_client(7).unwrap();
        assert_eq!(a.tenant_connections(7), 2);
        // Pending slots are free again; tenant 7 is at its limit.
        let mut t3 = a.accept().unwrap();
        assert!(t3.promote_client(7).is_err());
        assert!(t3.is_pending());
        t3.promote_client(8).unwrap();
        let mut t4 = a.accept().unwrap();
        assert!(t4.promote_client(9).is_err(), "server limit");
        t4.promote_admin();
        assert_eq!(a.open(), (0, 3, 1));
        drop(t1);
        assert_eq!(a.tenant_connections(7), 1);
        drop((t2, t3, t4));
        assert_eq!(a.open(), (0, 0, 0));
        assert_eq!(a.tenant_connections(7), 0);
    }
}
