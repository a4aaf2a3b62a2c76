//! p50/p99 latency and throughput of durable enqueues into the embedded queue, with
//! 1 KiB bodies and 1, 8 and 64 concurrent producers, then the batched drain rate.
//!
//! Run: `cargo run --release --example enqueue_latency [messages_per_run [producers]]`
//! (default 20000 messages, at least 100; 1, 8 and 64 producers, or only the count
//! given, any from 1 to 1024). The queue file lives in a temporary directory (set
//! `TMPDIR` to measure another disk).
//!
//! Each producer count runs twice on one file: first on a fresh file, which grows as it
//! fills (each `fdatasync` then also writes the file's size and extents), then again
//! after draining the first round, in a file already grown, which is a long-running
//! queue's steady state and what `benches/enqueue.rs` measures (it drains between
//! samples).

use bytes::Bytes;
use postbox::queue::{DeferReason, EmbeddedOptions, EmbeddedQueue, Envelope, Queue};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

fn envelope() -> Envelope {
    Envelope::new(
        "api:443",
        "POST",
        "https://api.example/orders",
        Bytes::from(vec![b'x'; 1024]),
        DeferReason::CircuitOpen,
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let only: Option<usize> = std::env::args().nth(2).map(|s| s.parse()).transpose()?;
    if total < 100 {
        return Err(format!("{total} messages per run: give at least 100").into());
    }
    if only.is_some_and(|p| !(1..=1024).contains(&p)) {
        return Err("give from 1 to 1024 producers".into());
    }
    println!(
        "durable enqueue, 1 KiB bodies, {total} messages per run ({} with one producer)",
        total / 10
    );
    let counts = match only {
        Some(p) => vec![p],
        None => vec![1, 8, 64],
    };
    for producers in counts {
        let dir = tempfile::tempdir()?;
        let q = Arc::new(EmbeddedQueue::open(
            dir.path().join("latency.redb"),
            EmbeddedOptions::new(),
        )?);
        let n = if producers == 1 { total / 10 } else { total };
        for round in ["fresh file", "grown file"] {
            enqueue_round(&q, n, producers, round).await?;
            drain(&q, producers, round).await?;
        }
        q.close().await?;
    }
    Ok(())
}

/// `n` enqueues from `producers` tasks; prints throughput and latency percentiles.
async fn enqueue_round(
    q: &Arc<EmbeddedQueue>,
    n: usize,
    producers: usize,
    round: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let before = q.stats();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let share = n / producers + usize::from(p < n % producers);
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(share);
            for _ in 0..share {
                let t = Instant::now();
                q.enqueue(envelope()).await.expect("enqueue");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::with_capacity(n);
    for t in tasks {
        lat.extend(t.await?);
    }
    let elapsed = start.elapsed();
    lat.sort();
    let stats = q.stats();
    let (ops, commits) = (
        stats.operations - before.operations,
        stats.commits - before.commits,
    );
    println!(
        "{producers:>2} producers, {round}: {:>8.0} msg/s  p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms  {:>5.1} enqueues/commit",
        n as f64 / elapsed.as_secs_f64(),
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat[lat.len() - 1].as_secs_f64() * 1e3,
        ops as f64 / commits.max(1) as f64,
    );
    Ok(())
}

/// Leases batches of 256 and acks each batch at once until the queue is empty; prints
/// the rate.
async fn drain(
    q: &EmbeddedQueue,
    producers: usize,
    round: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let mut drained = 0;
    loop {
        let leased = q
            .lease(256, Duration::from_secs(60), std::time::SystemTime::now())
            .await?;
        if leased.is_empty() {
            break;
        }
        let tokens: Vec<_> = leased.iter().map(|l| l.token).collect();
        q.ack(&tokens).await?;
        drained += tokens.len();
    }
    let elapsed = start.elapsed();
    println!(
        "{producers:>2} producers, {round}, drain (lease 256 + batched ack): {:>8.0} msg/s ({drained} messages)",
        drained as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
