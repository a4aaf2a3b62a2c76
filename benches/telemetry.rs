//! What telemetry costs a call when no `metrics` recorder is installed (the claim: at
//! most 5 ns per call).
//!
//! * `metrics/*`: the raw cost of the calls the layers make — the `counter!` macro with
//!   static labels (what a rejection, timeout or enqueue pays), a pre-registered
//!   `Counter` handle (what the retry layer pays per call), a gauge, and a `tracing`
//!   `debug!` event with no subscriber.
//! * `breaker/*`: a circuit breaker per call (`ready().await` + `call().await` on a
//!   `service_fn` that answers at once) with its per-call counter off and on
//!   ([`count_calls`](postbox::circuit_breaker::CircuitBreakerBuilder::count_calls)):
//!   the difference is what a layer that counts every call pays.
//!
//! Run: `cargo bench --bench telemetry -- --warm-up-time 1 --measurement-time 3`

use criterion::{Criterion, criterion_group, criterion_main};
use postbox::BoxError;
use postbox::circuit_breaker::CircuitBreakerLayer;
use std::future::{Ready, ready};
use std::hint::black_box;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

fn raw(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics");
    g.bench_function("counter_macro_static_labels", |b| {
        b.iter(|| {
            metrics::counter!("postbox_calls_total", "layer" => "bulkhead", "outcome" => "rejected")
                .increment(black_box(1))
        })
    });
    let reason: &'static str = black_box("circuit-open");
    g.bench_function("counter_macro_dynamic_label", |b| {
        b.iter(|| {
            metrics::counter!(
                "postbox_calls_total",
                "layer" => "enqueue",
                "outcome" => "enqueued",
                "reason" => reason
            )
            .increment(black_box(1))
        })
    });
    let handle = metrics::counter!("postbox_retry_attempts_total");
    g.bench_function("counter_handle", |b| {
        b.iter(|| black_box(&handle).increment(black_box(1)))
    });
    g.bench_function("gauge_macro", |b| {
        b.iter(|| metrics::gauge!("postbox_queue_depth", "state" => "pending").set(black_box(1.0)))
    });
    g.bench_function("tracing_debug_no_subscriber", |b| {
        b.iter(|| tracing::debug!(attempt = black_box(1u32), "attempt failed; retrying"))
    });
    g.bench_function("nothing", |b| b.iter(|| black_box(1u64)));
    g.finish();
}

fn ok_fn(x: u32) -> Ready<Result<u32, BoxError>> {
    ready(Ok(x))
}

fn breaker(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("breaker");
    for (id, count) in [("count_calls_off", false), ("count_calls_on", true)] {
        let layer = CircuitBreakerLayer::builder()
            .count_calls(count)
            .build()
            .unwrap();
        g.bench_function(id, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let mut svc = layer.layer(service_fn(ok_fn));
                async move {
                    let start = Instant::now();
                    for i in 0..iters {
                        let s = svc.ready().await.unwrap();
                        black_box(s.call(black_box(i as u32)).await.unwrap());
                    }
                    start.elapsed()
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, raw, breaker);
criterion_main!(benches);
