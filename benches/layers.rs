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

criterion_group!(benches, layers, bodies);
criterion_main!(benches);
