//! Per-call cost of the foundation layers next to tower's built-ins, in one run.
//!
//! Each iteration is `ready().await` + `call().await` through a `service_fn` that
//! answers at once, on a current-thread runtime.
//!
//! `cargo bench --bench layers`

use criterion::{Criterion, criterion_group, criterion_main};
use postbox::BoxError;
use postbox::bulkhead::BulkheadLayer;
use postbox::timeout::{AttemptTimeoutLayer, DeadlineLayer};
use std::future::{Ready, ready};
use std::hint::black_box;
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

fn inner()
-> impl Service<u64, Response = u64, Error = BoxError, Future = Ready<Result<u64, BoxError>>> + Clone
{
    service_fn(|x: u64| ready(Ok::<_, BoxError>(x)))
}

fn bench_service<S>(c: &mut Criterion, rt: &tokio::runtime::Runtime, id: &str, svc: S)
where
    S: Service<u64> + Clone + 'static,
    S::Error: std::fmt::Debug,
{
    c.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let mut svc = svc.clone();
            async move {
                let start = Instant::now();
                for i in 0..iters {
                    let ready = svc.ready().await.unwrap();
                    black_box(ready.call(black_box(i)).await.unwrap());
                }
                start.elapsed()
            }
        })
    });
}

fn layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
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
