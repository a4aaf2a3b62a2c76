//! Per-call cost of the foundation layers next to tower's built-ins, in one run.
//!
//! Each iteration is `ready().await` + `call().await` through a `service_fn` that
//! answers at once, on a current-thread runtime.
//!
//! `cargo bench --bench layers`

#[path = "support/mod.rs"]
mod support;

use criterion::{Criterion, criterion_group, criterion_main};
use postbox::bulkhead::BulkheadLayer;
use postbox::timeout::{AttemptTimeoutLayer, DeadlineLayer};
use std::time::Duration;
use support::{bench_service, inner, runtime};
use tower::Layer;

fn layers(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let d = Duration::from_secs(10);

    bench_service(c, &rt, "bare", inner());
    bench_service(
        c,
        &rt,
        "tower/timeout",
        tower::timeout::TimeoutLayer::new(d).layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "tower/concurrency_limit",
        tower::limit::ConcurrencyLimitLayer::new(64).layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "postbox/attempt_timeout",
        AttemptTimeoutLayer::new(d).unwrap().layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "postbox/deadline",
        DeadlineLayer::new(d).unwrap().layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "postbox/bulkhead",
        BulkheadLayer::new(64).unwrap().layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "postbox/deadline+bulkhead+attempt_timeout",
        DeadlineLayer::new(d).unwrap().layer(
            BulkheadLayer::new(64)
                .unwrap()
                .layer(AttemptTimeoutLayer::new(d).unwrap().layer(inner())),
        ),
    );
    bench_service(
        c,
        &rt,
        "tower/timeout+concurrency_limit+timeout",
        tower::timeout::TimeoutLayer::new(d).layer(
            tower::limit::ConcurrencyLimitLayer::new(64)
                .layer(tower::timeout::TimeoutLayer::new(d).layer(inner())),
        ),
    );
}

criterion_group!(benches, layers);
criterion_main!(benches);
