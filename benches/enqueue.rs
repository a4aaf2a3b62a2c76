//! Durable enqueue and drain throughput of the embedded (redb) queue, 1 KiB bodies.
//!
//! Run: `cargo bench --bench enqueue`. Each enqueue is fsynced before it returns;
//! concurrent producers share commits (group commit). Each enqueue sample starts from
//! an empty queue (what it stored is drained, untimed, after it). For p50/p99 enqueue
//! latency run `cargo run --release --example enqueue_latency`.
//!
//! `baseline/disk/…` measures the disk under the queue in the same run: one write into
//! an already-allocated file followed by `fdatasync`, of 4 KiB and of 160 KiB (about
//! what one 64-message commit writes). A 64-producer commit cannot take less than the
//! latter, so `64 / its time` bounds the enqueue rate on that disk; the enqueue figures
//! are only comparable between machines (or runs) next to these.

#![allow(missing_docs)] // criterion's macros generate undocumented items

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use postbox::queue::{DeferReason, EmbeddedOptions, EmbeddedQueue, Envelope, Queue};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
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

/// Enqueues `n` messages from `producers` concurrent tasks; returns the elapsed time.
async fn enqueue_n(q: &Arc<EmbeddedQueue>, n: u64, producers: u64) -> Duration {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(producers as usize);
    for p in 0..producers {
        let share = n / producers + u64::from(p < n % producers);
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..share {
                q.enqueue(envelope()).await.expect("enqueue");
            }
        }));
    }
    for t in tasks {
        t.await.expect("producer");
    }
    start.elapsed()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn bench_enqueue(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("postbox/enqueue/redb");
    group.throughput(Throughput::Elements(1));
    for producers in [1u64, 8, 64] {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Arc::new(
            EmbeddedQueue::open(dir.path().join("bench.redb"), EmbeddedOptions::new())
                .expect("open"),
        );
        let name = if producers == 1 {
            "1_producer".to_owned()
        } else {
            format!("{producers}_producers")
        };
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let q = q.clone();
                async move {
                    let elapsed = enqueue_n(&q, iters, producers).await;
                    // Not timed: drain what this sample stored, so every sample starts
                    // from an empty queue instead of a backlog that grows with the
                    // number of samples (a redb file of 200k messages commits slower).
                    drain(&q, iters).await;
                    elapsed
                }
            });
        });
    }
    group.finish();
}

/// Leases and acks `n` messages in batches of `BATCH`.
async fn drain(q: &EmbeddedQueue, n: u64) {
    const BATCH: usize = 256;
    let mut left = n;
    while left > 0 {
        let leased = q
            .lease(BATCH, Duration::from_secs(60), SystemTime::now())
            .await
            .expect("lease");
        assert!(!leased.is_empty(), "queue drained early");
        let tokens: Vec<_> = leased.iter().map(|l| l.token).collect();
        q.ack(&tokens).await.expect("ack");
        left -= tokens.len() as u64;
    }
}

fn bench_drain(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let q = Arc::new(
        EmbeddedQueue::open(dir.path().join("drain.redb"), EmbeddedOptions::new()).expect("open"),
    );
    let mut group = c.benchmark_group("postbox/replay");
    group.throughput(Throughput::Elements(1));
    group.bench_function("drain_batched", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let q = q.clone();
            async move {
                // Not timed: fill the queue with `iters` messages.
                enqueue_n(&q, iters, 64).await;
                let start = Instant::now();
                drain(&q, iters).await;
                start.elapsed()
            }
        });
    });
    group.finish();
}

#[cfg(not(unix))]
fn bench_disk(_: &mut Criterion) {}

#[cfg(unix)]
fn bench_disk(c: &mut Criterion) {
    use std::os::unix::fs::FileExt;
    const FILE: u64 = 16 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("disk"))
        .expect("open");
    // Written and synced once, so the timed writes allocate nothing.
    file.write_all_at(&vec![0u8; FILE as usize], 0)
        .expect("fill");
    file.sync_all().expect("sync");
    let mut group = c.benchmark_group("baseline/disk");
    for (name, len) in [
        ("write_4k_fdatasync", 4u64 << 10),
        ("write_160k_fdatasync", 160 << 10),
    ] {
        let buf = vec![0xa5u8; len as usize];
        let mut offset = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                file.write_all_at(&buf, offset).expect("write");
                file.sync_data().expect("fdatasync");
                offset = (offset + len) % (FILE - len);
            });
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_disk, bench_enqueue, bench_drain
}
criterion_main!(benches);
