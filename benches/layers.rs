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

/// A body of 16 ready 1 KiB frames.
struct Frames(u8);

impl http_body::Body for Frames {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        static KIB: [u8; 1024] = [b'x'; 1024];
        if self.0 == 0 {
            return std::task::Poll::Ready(None);
        }
        self.0 -= 1;
        let data = bytes::Bytes::from_static(&KIB);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(data))))
    }
}

/// `body/bare` and `body/deadline`: reading a 16-frame body as it is, and through a
/// `DeadlineBody` with a deadline (`BodyDeadlineLayer`); every frame ready, so the
/// timer is never armed.
fn bodies(c: &mut Criterion) {
    use http_body_util::BodyExt;
    use postbox::timeout::DeadlineBody;
    let rt = runtime();
    let mut g = c.benchmark_group("body");
    g.bench_function("bare", |b| {
        b.to_async(&rt).iter(|| async {
            std::hint::black_box(Frames(16).collect().await.unwrap());
        })
    });
    let at = {
        let _guard = rt.enter();
        tokio::time::Instant::now() + Duration::from_secs(3600)
    };
    g.bench_function("deadline", |b| {
        b.to_async(&rt).iter(|| async {
            let body = DeadlineBody::new(Frames(16), Some(at));
            std::hint::black_box(body.collect().await.unwrap());
        })
    });
    g.finish();
}

/// `retry_http/bare` and `retry_http/retry`: one HTTP POST without a key (so the retry
/// checks for one) with four headers (built in
/// the loop, in both) straight to a `service_fn`, and through `RetryLayer::http` with
/// no retry needed; `retry_http/retry_grpc_timeout` is a gRPC call whose caller set a
/// `grpc-timeout` (anchored as the call's deadline before the first attempt).
/// `bulkhead_http/one` and `bulkhead_http/per_authority`: the same request through one
/// bulkhead, and through a bulkhead per authority.
fn retry_http(c: &mut Criterion) {
    use http::{Request, Response};
    use postbox::retry::RetryLayer;
    use tower::{Service, ServiceExt};
    let rt = runtime();
    let _guard = rt.enter();
    let request = |grpc: bool| {
        let b = Request::post("http://api.internal/orders")
            .header("host", "api.internal")
            .header("accept", "*/*")
            .header("user-agent", "bench");
        let b = if grpc {
            b.header("content-type", "application/grpc")
                .header("grpc-timeout", "2S")
        } else {
            b.header("content-type", "application/json")
        };
        b.body(()).unwrap()
    };
    let mut run = |group: &str,
                   id: &str,
                   grpc: bool,
                   svc: tower::util::BoxCloneSyncService<
        Request<()>,
        Response<()>,
        postbox::BoxError,
    >| {
        let mut g = c.benchmark_group(group);
        g.bench_function(id, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let mut svc = svc.clone();
                async move {
                    let start = tokio::time::Instant::now();
                    for _ in 0..iters {
                        let ready = svc.ready().await.unwrap();
                        std::hint::black_box(ready.call(request(grpc)).await.unwrap());
                    }
                    start.elapsed()
                }
            })
        });
        g.finish();
    };
    let answer =
        tower::service_fn(|_: Request<()>| async { Ok::<_, postbox::BoxError>(Response::new(())) });
    let retry = RetryLayer::http().build().unwrap();
    run(
        "retry_http",
        "bare",
        false,
        tower::util::BoxCloneSyncService::new(answer),
    );
    run(
        "retry_http",
        "retry",
        false,
        tower::util::BoxCloneSyncService::new(retry.layer(answer)),
    );
    run(
        "retry_http",
        "bare_grpc",
        true,
        tower::util::BoxCloneSyncService::new(answer),
    );
    run(
        "retry_http",
        "retry_grpc_timeout",
        true,
        tower::util::BoxCloneSyncService::new(retry.layer(answer)),
    );
    // One bulkhead for the stack against one per authority (the config client
    // stack's): the map lookup and the clone of the inner service per call.
    run(
        "bulkhead_http",
        "bare",
        false,
        tower::util::BoxCloneSyncService::new(answer),
    );
    let bulkhead = postbox::bulkhead::BulkheadLayer::builder().max_concurrent(64);
    run(
        "bulkhead_http",
        "one",
        false,
        tower::util::BoxCloneSyncService::new(bulkhead.clone().build().unwrap().layer(answer)),
    );
    run(
        "bulkhead_http",
        "per_authority",
        false,
        tower::util::BoxCloneSyncService::new(bulkhead.keyed_by_authority().unwrap().layer(answer)),
    );
}

criterion_group!(benches, layers, bodies, retry_http);
criterion_main!(benches);
