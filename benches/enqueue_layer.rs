//! Per-call cost of `EnqueueFallbackLayer` on the success path (nothing is enqueued):
//! a `POST` with eight headers and a 1 KiB body through the layer, next to the same
//! call straight to the service, in one run. Every iteration builds the request (both
//! sides), so the difference is the layer's own work: the key, the capture it keeps in
//! case the call fails, and its future.
//!
//! The same request through the server's `Idempotency` layer: with a new key each time
//! (claim, handler in a task of its own, response stored) and with one key repeated
//! (answered from the store).
//!
//! `cargo bench --bench enqueue_layer`

#![allow(missing_docs)] // criterion's macros generate undocumented items

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use postbox::BoxError;
use postbox::enqueue::EnqueueFallbackLayer;
use postbox::idempotency::IdempotencyLayer;
use postbox::queue::MemoryQueue;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

fn request(body: &Bytes) -> Request<Full<Bytes>> {
    Request::post("https://api.example/orders")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("authorization", "Bearer 0123456789abcdef0123456789abcdef")
        .header("user-agent", "postbox-bench/1")
        .header("x-request-id", "6f1c0e7e-3b1e-4c58-9a8e-6d1f0c2b9a11")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("x-tenant", "acme")
        .header("idempotency-key", "order-42")
        .body(Full::new(body.clone()))
        .expect("request")
}

fn bench<S, B>(c: &mut Criterion, rt: &tokio::runtime::Runtime, id: &str, svc: S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + 'static,
    S::Error: std::fmt::Debug,
{
    let body = Bytes::from(vec![b'x'; 1024]);
    c.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let mut svc = svc.clone();
            let body = body.clone();
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let ready = svc.ready().await.unwrap();
                    black_box(ready.call(request(&body)).await.unwrap());
                }
                start.elapsed()
            }
        });
    });
}

/// As [`bench`], each request with a key of its own if `fresh`.
fn keyed<S, B>(c: &mut Criterion, rt: &tokio::runtime::Runtime, id: &str, fresh: bool, svc: S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + 'static,
    S::Error: std::fmt::Debug,
{
    let body = Bytes::from(vec![b'x'; 1024]);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    c.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let mut svc = svc.clone();
            let body = body.clone();
            let next = next.clone();
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut req = request(&body);
                    if fresh {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        req.headers_mut()
                            .insert("idempotency-key", http::HeaderValue::from(n));
                    }
                    let ready = svc.ready().await.unwrap();
                    black_box(ready.call(req).await.unwrap());
                }
                start.elapsed()
            }
        });
    });
}

fn layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    fn ok<Req>()
    -> impl Service<Req, Response = Response<Full<Bytes>>, Error = BoxError, Future: Send>
    + Clone
    + Send
    + 'static {
        service_fn(|_req: Req| async { Ok::<_, BoxError>(Response::new(Full::new(Bytes::new()))) })
    }
    bench(c, &rt, "baseline/http/service_fn", ok());
    keyed(
        c,
        &rt,
        "postbox/idempotency/new_key",
        true,
        IdempotencyLayer::new(10_000).layer(ok()),
    );
    keyed(
        c,
        &rt,
        "postbox/idempotency/repeated_key",
        false,
        IdempotencyLayer::new(10_000).layer(ok()),
    );
    let queue = Arc::new(MemoryQueue::new());
    bench(
        c,
        &rt,
        "postbox/enqueue_layer/http_success",
        EnqueueFallbackLayer::new(queue).layer(ok()),
    );
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = layer
}
criterion_main!(benches);
