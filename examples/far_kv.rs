//! A key-value store of customer accounts in far memory, with an
//! analytics job over its transaction log.
//!
//! The accounts live in a `FarHashMap`, the transaction log in a `FarVec`,
//! pending transfers in a `FarQueue`; only a small object cache is local.
//! The job serves Zipfian lookups and transfers, then computes totals over
//! the log twice — fetching the log, and offloading the work to the memory
//! servers — and checks that both agree.
//!
//! Start a cluster with `remora up`, then run, with the address and token
//! it prints:
//!
//! ```text
//! REMORA_CONTROLLER=127.0.0.1:7070 REMORA_TOKEN=... \
//!     cargo run --release --example far_kv -- --accounts 1000000 --local-mem 16MiB
//! ```

use std::time::Instant;

use remora::objects::{CacheConfig, Cmp, FarHashMap, FarQueue, FarVec, ObjectCache};
use remora::Cluster;

/// An account: balance (cents) and the number of transfers it took part in.
type Account = [i64; 2];

struct Args {
    accounts: u64,
    transfers: u64,
    local_mem: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        accounts: 200_000,
        transfers: 200_000,
        local_mem: 8 << 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--accounts" => a.accounts = value.parse().map_err(|e| format!("--accounts: {e}"))?,
            "--transfers" => {
                a.transfers = value.parse().map_err(|e| format!("--transfers: {e}"))?
            }
            "--local-mem" => {
                a.local_mem =
                    remora::size::parse_size(&value).map_err(|e| format!("--local-mem: {e}"))?
            }
            other => {
                return Err(format!(
                    "unknown option {other} (--accounts, --transfers, --local-mem)"
                ))
            }
        }
    }
    if a.accounts < 2 {
        return Err("--accounts must be at least 2".into());
    }
    Ok(a)
}

/// A small deterministic generator with a skew towards low account ids.
struct Skewed(u64);

impl Skewed {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        // The square of a uniform draw favours small ids.
        let u = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        ((u * u) * n as f64) as u64 % n
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("far_kv: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let controller = std::env::var("REMORA_CONTROLLER")
        .map_err(|_| "set REMORA_CONTROLLER and REMORA_TOKEN (printed by `remora up`)")?;
    let token = std::env::var("REMORA_TOKEN").map_err(|_| "set REMORA_TOKEN")?;
    let cluster = Cluster::connect(&controller, &token)?;
    let cache = ObjectCache::new(
        cluster,
        CacheConfig {
            budget: args.local_mem,
            ..CacheConfig::default()
        },
    )?;

    // Load the accounts: 1000.00 each.
    let t = Instant::now();
    let mut accounts = FarHashMap::<u64, Account>::with_capacity(&cache, args.accounts as usize)?;
    for id in 0..args.accounts {
        accounts.insert(id, [100_000, 0])?;
    }
    println!(
        "loaded {} accounts in {:.2} s",
        args.accounts,
        t.elapsed().as_secs_f64()
    );

    // Queue transfers, then apply them, logging each amount.
    let mut pending = FarQueue::<[u64; 3]>::new(&cache)?;
    let mut rng = Skewed(0x2545_F491_4F6C_DD1D);
    for _ in 0..args.transfers {
        let from = rng.next(args.accounts);
        let to = (from + 1 + rng.next(args.accounts - 1)) % args.accounts;
        let cents = 1 + rng.next(50_000);
        pending.push_back([from, to, cents])?;
    }
    let mut log = FarVec::<i64>::new(&cache)?;
    let t = Instant::now();
    let mut refused = 0u64;
    while let Some([from, to, cents]) = pending.pop_front()? {
        let a = accounts.get(&from)?.ok_or("missing account")?;
        if a[0] < cents as i64 {
            refused += 1;
            continue;
        }
        let b = accounts.get(&to)?.ok_or("missing account")?;
        accounts.insert(from, [a[0] - cents as i64, a[1] + 1])?;
        accounts.insert(to, [b[0] + cents as i64, b[1] + 1])?;
        log.push(cents as i64)?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "applied {} transfers ({} refused for lack of funds) in {:.2} s: {:.0} transfers/s",
        log.len(),
        refused,
        secs,
        args.transfers as f64 / secs
    );

    // Money is conserved: read every account back.
    let total: i64 = accounts.entries()?.iter().map(|(_, a)| a[0]).sum();
    if total != 100_000 * args.accounts as i64 {
        return Err(format!(
            "balances add up to {total}, not {}",
            100_000 * args.accounts as i64
        )
        .into());
    }

    // Analytics over the log: fetched here, then at the servers.
    let n = log.len();
    let t = Instant::now();
    let local = log.aggregate_local(0..n)?;
    let large_local = log.filter_local(0..n, Cmp::Ge, 40_000)?.len();
    let fetched = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let offloaded = log.aggregate_offloaded(0..n)?;
    let large_offloaded = log.filter_offloaded(0..n, Cmp::Ge, 40_000)?.len();
    let off = t.elapsed().as_secs_f64();
    if local != offloaded || large_local != large_offloaded {
        return Err("offloaded analytics disagree with the local computation".into());
    }
    println!(
        "log of {n} transfers: total {:.2}, largest {:.2}, {} of 400.00 or more",
        offloaded.sum_i64() as f64 / 100.0,
        offloaded.max.unwrap_or(0) as f64 / 100.0,
        large_offloaded
    );
    println!("analytics: fetched {fetched:.3} s, offloaded {off:.3} s (same results)");
    let st = cache.stats();
    println!(
        "cache: budget {} KiB, resident {} KiB; {} misses, {} evictions, {:.1} MiB fetched, {:.1} MiB written back; far: {:.1} MiB",
        cache.budget() >> 10,
        st.resident_bytes >> 10,
        st.misses,
        st.evictions,
        st.fetched_bytes as f64 / (1 << 20) as f64,
        st.written_bytes as f64 / (1 << 20) as f64,
        st.far_bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}
