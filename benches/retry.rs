//! Per-call cost of the retry layer when no retry is needed, next to tower's `Retry`
//! with a policy that never retries.
//!
//! Each iteration is `ready().await` + `call().await` through a `service_fn` that
//! answers at once, on a current-thread runtime.
//!
//! `cargo bench --bench retry`

use criterion::{Criterion, criterion_group, criterion_main};
use postbox::BoxError;
use postbox::retry::{RetryBudget, RetryLayer};
use std::future::{Ready, ready};
use std::hint::black_box;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

fn inner()
-> impl Service<u64, Response = u64, Error = BoxError, Future = Ready<Result<u64, BoxError>>> + Clone
{
    service_fn(|x: u64| ready(Ok::<_, BoxError>(x)))
}

/// A tower policy that never retries (but clones the request, as any retrying policy
/// must before the first attempt).
#[derive(Debug, Clone, Copy)]
struct Never;

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for Never {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Req, _: &mut Result<Res, E>) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
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

fn retry(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();

    bench_service(c, &rt, "bare", inner());
    bench_service(
        c,
        &rt,
        "tower/retry_never",
        tower::retry::RetryLayer::new(Never).layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "postbox/retry/no_retry_needed",
        RetryLayer::builder()
            .no_budget()
            .build()
            .unwrap()
            .layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "postbox/retry/with_budget",
        RetryLayer::builder()
            .budget(RetryBudget::new())
            .build()
            .unwrap()
            .layer(inner()),
    );
}

criterion_group!(benches, retry);
criterion_main!(benches);
