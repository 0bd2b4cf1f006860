//! Model checking of the far mutex and barrier with shuttle's randomized
//! scheduler: the algorithms run unchanged over a model of the memory
//! server's words (each `cas`/`faa` is one linearizable step, as the server
//! makes it), and every interleaving explored must keep mutual exclusion and
//! barrier semantics.

use std::sync::Arc;

use remora_client::{FarBarrier, FarMutex, FarWords};
use shuttle::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The server's words: one atomic per 8-byte word.
struct ModelWords {
    words: Vec<AtomicU64>,
}

impl ModelWords {
    fn new(n: usize) -> Self {
        ModelWords {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn word(&self, offset: u64) -> &AtomicU64 {
        &self.words[(offset / 8) as usize]
    }
}

impl FarWords for ModelWords {
    fn cas(&self, offset: u64, expected: u64, new: u64) -> remora_client::Result<u64> {
        Ok(
            match self.word(offset).compare_exchange(
                expected,
                new,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(v) | Err(v) => v,
            },
        )
    }

    fn faa(&self, offset: u64, delta: u64) -> remora_client::Result<u64> {
        Ok(self.word(offset).fetch_add(delta, Ordering::SeqCst))
    }

    fn pause(&self, _step: &mut u32) {
        shuttle::thread::yield_now();
    }

    fn describe(&self) -> String {
        "model".into()
    }
}

#[test]
fn mutex_gives_mutual_exclusion() {
    shuttle::check_random(
        || {
            let words = Arc::new(ModelWords::new(4));
            let in_cs = Arc::new(AtomicBool::new(false));
            let entered = Arc::new(AtomicU64::new(0));
            let hs: Vec<_> = (0..3)
                .map(|_| {
                    let (words, in_cs, entered) = (words.clone(), in_cs.clone(), entered.clone());
                    shuttle::thread::spawn(move || {
                        let m = FarMutex::new(&*words, 8);
                        for _ in 0..2 {
                            let g = m.lock().unwrap();
                            assert!(!in_cs.swap(true, Ordering::SeqCst), "two holders at once");
                            shuttle::thread::yield_now();
                            in_cs.store(false, Ordering::SeqCst);
                            entered.fetch_add(1, Ordering::SeqCst);
                            g.unlock().unwrap();
                        }
                        // try_lock never succeeds while someone holds the lock.
                        if let Some(g) = m.try_lock().unwrap() {
                            assert!(!in_cs.swap(true, Ordering::SeqCst), "try_lock while held");
                            in_cs.store(false, Ordering::SeqCst);
                            drop(g);
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            assert_eq!(entered.load(Ordering::SeqCst), 6);
            assert_eq!(words.faa(8, 0).unwrap(), 0, "lock left held");
        },
        2000,
    );
}

#[test]
fn barrier_releases_only_full_rounds_with_one_leader() {
    shuttle::check_random(
        || {
            const PARTIES: usize = 3;
            const ROUNDS: usize = 3;
            let words = Arc::new(ModelWords::new(4));
            let arrived: Arc<Vec<AtomicU64>> =
                Arc::new((0..ROUNDS).map(|_| AtomicU64::new(0)).collect());
            let leaders: Arc<Vec<AtomicU64>> =
                Arc::new((0..ROUNDS).map(|_| AtomicU64::new(0)).collect());
            let hs: Vec<_> = (0..PARTIES)
                .map(|_| {
                    let (words, arrived, leaders) =
                        (words.clone(), arrived.clone(), leaders.clone());
                    shuttle::thread::spawn(move || {
                        let b = FarBarrier::new(&*words, 0, PARTIES as u64);
                        for round in 0..ROUNDS {
                            arrived[round].fetch_add(1, Ordering::SeqCst);
                            if b.wait().unwrap() {
                                leaders[round].fetch_add(1, Ordering::SeqCst);
                            }
                            // Nobody passes before everyone arrived.
                            assert_eq!(
                                arrived[round].load(Ordering::SeqCst),
                                PARTIES as u64,
                                "round {round}"
                            );
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            for l in leaders.iter() {
                assert_eq!(l.load(Ordering::SeqCst), 1, "one leader per round");
            }
        },
        2000,
    );
}

/// A backup copy in the model: its word, and the primary's.
struct ModelCopy {
    primary: Arc<AtomicU64>,
    backup: Arc<AtomicU64>,
    tries: u32,
}

impl remora_client::chain::WordCopy for ModelCopy {
    fn cas(&mut self, expected: u64, new: u64) -> remora_client::Result<u64> {
        Ok(
            match self
                .backup
                .compare_exchange(expected, new, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(v) | Err(v) => v,
            },
        )
    }

    fn primary(&mut self) -> remora_client::Result<u64> {
        Ok(self.primary.load(Ordering::SeqCst))
    }

    fn patience_exhausted(&mut self) -> bool {
        self.tries += 1;
        self.tries > 8
    }

    fn pause(&mut self) {
        shuttle::thread::yield_now();
    }
}

#[test]
fn replicated_atomics_keep_every_copy_in_the_primarys_order() {
    use remora_client::chain::follow;
    shuttle::check_random(
        || {
            const THREADS: u64 = 3;
            const ADDS: u64 = 2;
            let primary = Arc::new(AtomicU64::new(0));
            let backups: Vec<Arc<AtomicU64>> =
                (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
            let hs: Vec<_> = (0..THREADS)
                .map(|_| {
                    let (primary, backups) = (primary.clone(), backups.clone());
                    shuttle::thread::spawn(move || {
                        let mut olds = Vec::new();
                        for _ in 0..ADDS {
                            // The primary orders; then each backup follows.
                            let old = primary.fetch_add(1, Ordering::SeqCst);
                            for b in &backups {
                                let mut c = ModelCopy {
                                    primary: primary.clone(),
                                    backup: b.clone(),
                                    tries: 0,
                                };
                                follow(&mut c, old, old + 1).unwrap();
                            }
                            olds.push(old);
                        }
                        olds
                    })
                })
                .collect();
            // A client that dies after the primary applied its add and
            // before any backup heard of it: the others must repair.
            let dead = {
                let primary = primary.clone();
                shuttle::thread::spawn(move || primary.fetch_add(1, Ordering::SeqCst))
            };
            let mut olds: Vec<u64> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
            let dead_old = dead.join().unwrap();
            olds.sort_unstable();
            olds.dedup();
            assert_eq!(
                olds.len() as u64,
                THREADS * ADDS,
                "an add was ordered twice"
            );
            let p = primary.load(Ordering::SeqCst);
            assert_eq!(p, THREADS * ADDS + 1);
            // Every backup converged to the primary, unless the dead
            // client's add was the very last transition (then nobody
            // followed after it, and the backups hold the value before it).
            let want = if dead_old == p - 1 { p - 1 } else { p };
            for b in &backups {
                let v = b.load(Ordering::SeqCst);
                assert_eq!(v, want, "backup {v}, primary {p}, lost add at {dead_old}");
            }
        },
        3000,
    );
}
