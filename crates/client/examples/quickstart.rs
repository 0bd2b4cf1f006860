//! The README's library tour, as a program.
//!
//! Start a cluster with `remora up`, then:
//!
//! ```sh
//! REMORA_CONTROLLER=127.0.0.1:7070 REMORA_TOKEN=<token printed by remora up> \
//!     cargo run --release -p remora-client --example quickstart
//! ```

use remora_client::{BatchResult, Cluster};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let controller = std::env::var("REMORA_CONTROLLER").unwrap_or_else(|_| "127.0.0.1:7070".into());
    let token = std::env::var("REMORA_TOKEN")
        .map_err(|_| "set REMORA_TOKEN to the token `remora up` printed")?;
    let cluster = Cluster::connect(&controller, &token)?;
    println!("connected to {controller} as tenant {:?}", cluster.tenant());

    // A 64 MiB region, spread over the servers.
    let region = cluster.alloc_region(64 << 20)?;
    let servers: std::collections::HashSet<_> =
        region.map().slabs.iter().map(|s| s.addr.clone()).collect();
    println!(
        "region {}: {} slabs on {} servers",
        region.id(),
        region.map().slabs.len(),
        servers.len()
    );

    region.write(4096, b"hello, far memory")?;
    let mut buf = [0u8; 17];
    region.read(4096, &mut buf)?;
    println!("read back: {}", String::from_utf8_lossy(&buf));

    // Atomics on 8-byte aligned little-endian words.
    let before = region.fetch_add(0, 1)?;
    let swapped = region.compare_and_swap(8, 0, 42)? == 0;
    println!(
        "counter was {before}; swap {}",
        if swapped { "succeeded" } else { "failed" }
    );

    // Many requests in flight from one thread.
    let reads: Vec<_> = (0..64).map(|i| region.read_async(i * 4096, 4096)).collect();
    let pages = futures::executor::block_on(futures::future::join_all(reads));
    println!(
        "{} pages read with 64 requests in flight",
        pages.into_iter().filter(|p| p.is_ok()).count()
    );

    // One frame per server for a batch.
    let results = region
        .batch()
        .read(0, 8)
        .write(16, b"x")
        .fetch_add(24, 1)
        .execute()?;
    if let BatchResult::Data(d) = &results[0] {
        println!("batch read {} bytes", d.len());
    }

    // A mutex and a barrier on far words (for clients sharing a named region).
    let guard = region.mutex(1024).lock()?;
    guard.unlock()?;
    region.barrier(2048, 1).wait()?;

    cluster.free_region(region.id())?;
    println!("done");
    Ok(())
}
