//! postbox next to tower's built-ins and tower-resilience, per layer and for a full
//! client stack, in one criterion run (the README's performance table).
//!
//! Each iteration is `ready().await` + `call().await` through a `service_fn` that
//! answers at once, on a current-thread runtime: the per-call overhead of the happy
//! path.
//!
//! `cargo bench --bench compare`

#[path = "support/mod.rs"]
mod support;

use criterion::{Criterion, criterion_group, criterion_main};
use postbox::bulkhead::BulkheadLayer;
use postbox::circuit_breaker::CircuitBreakerLayer;
use postbox::retry::{RetryBudget, RetryLayer};
use postbox::timeout::{AttemptTimeoutLayer, DeadlineLayer};
use std::time::Duration;
use support::{Never, bench_service, inner, runtime};
use tower::{Layer, ServiceBuilder};
use tower_resilience_bulkhead::BulkheadLayer as TrBulkhead;
use tower_resilience_circuitbreaker::CircuitBreakerLayer as TrBreaker;
use tower_resilience_retry::RetryLayer as TrRetry;
use tower_resilience_timelimiter::TimeLimiterLayer as TrTimeLimiter;

const LONG: Duration = Duration::from_secs(10);

fn compare(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();

    bench_service(c, &rt, "bare", inner());

    // --- timeout ---
    bench_service(
        c,
        &rt,
        "timeout/tower",
        tower::timeout::TimeoutLayer::new(LONG).layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "timeout/tower_resilience",
        TrTimeLimiter::builder()
            .timeout_duration(LONG)
            .build()
            .layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "timeout/postbox",
        AttemptTimeoutLayer::new(LONG).unwrap().layer(inner()),
    );

    // --- concurrency ---
    bench_service(
        c,
        &rt,
        "bulkhead/tower_concurrency_limit",
        tower::limit::ConcurrencyLimitLayer::new(64).layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "bulkhead/tower_resilience",
        TrBulkhead::builder()
            .max_concurrent_calls(64)
            .build()
            .unwrap()
            .layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "bulkhead/postbox",
        BulkheadLayer::new(64).unwrap().layer(inner()),
    );

    // --- retry (no retry needed) ---
    bench_service(
        c,
        &rt,
        "retry/tower",
        tower::retry::RetryLayer::new(Never).layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "retry/tower_resilience",
        TrRetry::builder()
            .max_attempts(3)
            .fixed_backoff(Duration::from_millis(10))
            .build()
            .layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "retry/postbox",
        RetryLayer::builder()
            .budget(RetryBudget::new())
            .build()
            .unwrap()
            .layer(inner()),
    );

    // --- circuit breaker (closed) ---
    bench_service(
        c,
        &rt,
        "breaker/tower_resilience",
        TrBreaker::builder().build().unwrap().layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "breaker/postbox",
        CircuitBreakerLayer::builder()
            .build()
            .unwrap()
            .layer(inner()),
    );

    // --- a full client stack: deadline → retry → breaker → bulkhead → attempt timeout ---
    bench_service(
        c,
        &rt,
        "stack/tower",
        ServiceBuilder::new()
            .layer(tower::timeout::TimeoutLayer::new(LONG))
            .layer(tower::retry::RetryLayer::new(Never))
            .layer(tower::limit::ConcurrencyLimitLayer::new(64))
            .layer(tower::timeout::TimeoutLayer::new(LONG))
            .service(inner()),
    );
    bench_service(
        c,
        &rt,
        "stack/tower_resilience",
        ServiceBuilder::new()
            .layer(TrTimeLimiter::builder().timeout_duration(LONG).build())
            .layer(
                TrRetry::builder()
                    .max_attempts(3)
                    .fixed_backoff(Duration::from_millis(10))
                    .build(),
            )
            .layer(TrBreaker::builder().build().unwrap())
            .layer(
                TrBulkhead::builder()
                    .max_concurrent_calls(64)
                    .build()
                    .unwrap(),
            )
            .layer(TrTimeLimiter::builder().timeout_duration(LONG).build())
            .service(inner()),
    );
    bench_service(
        c,
        &rt,
        "stack/postbox",
        ServiceBuilder::new()
            .layer(DeadlineLayer::new(LONG).unwrap())
            .layer(
                RetryLayer::builder()
                    .budget(RetryBudget::new())
                    .build()
                    .unwrap(),
            )
            .layer(CircuitBreakerLayer::builder().build().unwrap())
            .layer(BulkheadLayer::new(64).unwrap())
            .layer(AttemptTimeoutLayer::new(LONG).unwrap())
            .service(inner()),
    );
}

criterion_group!(benches, compare);
criterion_main!(benches);
