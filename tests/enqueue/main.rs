//! Enqueue instead of block: triggers, never-cases, receipts, durability, the
//! replayer and the server-side Idempotency layer.

#![cfg(feature = "http")]
#![allow(missing_docs)] // test crate

#[path = "../support/mod.rs"]
mod shared;
mod support;

use self::shared::sample;
use self::support::*;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use postbox::BoxError;
use postbox::bulkhead::error::Full as BulkheadFull;
use postbox::circuit_breaker::error::Open;
use postbox::classify::HttpClassifier;
use postbox::enqueue::error::NotEnqueued;
use postbox::enqueue::{
    BufferedBody, Captured, DEFER_REASON_HEADER, DeferLayer, DeferPolicy, Deferred, EnqueueConfig,
    EnqueueFallback, EnqueueFallbackLayer, IDEMPOTENCY_KEY_HEADER, MESSAGE_ID_HEADER, Receipt,
    ReplayStats, Replayer, RequestCodec,
};
use postbox::error::find_cause;
use postbox::idempotency::{
    Claim, ClaimToken, FingerprintedBody, IdempotencyLayer, IdempotencyStore, MemoryStore,
    REPLAYED_HEADER, StoredResponse, StreamThrough,
};
use postbox::queue::{DeferReason, Depth, Envelope, MemoryQueue, MessageId, Queue, QueueError};
use postbox::timeout::error::DeadlineExceeded;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_test::{assert_pending, task};
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

type Fut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a dependency saw: method, idempotency key, body.
type Seen = (String, Option<String>, Bytes);

/// A dependency that records every request it sees and answers with `answer()`.
#[derive(Clone, Default)]
struct Dependency {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Dependency {
    fn service<F>(
        &self,
        answer: F,
    ) -> impl Service<
        InnerReq,
        Response = Res,
        Error = BoxError,
        Future = Fut<Result<Res, BoxError>>,
    > + Clone
    + use<F>
    where
        F: Fn() -> Result<Res, BoxError> + Clone + Send + Sync + 'static,
    {
        let seen = self.seen.clone();
        service_fn(move |req: InnerReq| {
            let seen = seen.clone();
            let answer = answer.clone();
            Box::pin(async move {
                // Every value, comma-joined: a repeated header shows.
                let keys: Vec<_> = req
                    .headers()
                    .get_all(IDEMPOTENCY_KEY_HEADER)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()))
                    .collect();
                let key = (!keys.is_empty()).then(|| keys.join(", "));
                let method = req.method().to_string();
                let body = bytes_of(req.into_body()).await;
                seen.lock().unwrap().push((method, key, body));
                answer()
            }) as Fut<Result<Res, BoxError>>
        })
    }

    fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn keys(&self) -> Vec<Option<String>> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, k, _)| k.clone())
            .collect()
    }
}

async fn depth(q: &MemoryQueue) -> Depth {
    q.depth().await.unwrap()
}

/// A memory queue, a dependency that answers `503`, and the layer with `config` in
/// front of it.
#[expect(
    clippy::type_complexity,
    reason = "the layer over an opaque test service, which a type alias cannot name"
)]
fn over_a_failing_dependency(
    config: EnqueueConfig,
) -> (
    Arc<MemoryQueue>,
    Dependency,
    EnqueueFallback<
        impl Service<InnerReq, Response = Res, Error = BoxError, Future = Fut<Result<Res, BoxError>>>
        + Clone,
        MemoryQueue,
        HttpClassifier,
    >,
) {
    let queue = Arc::new(MemoryQueue::new());
    let dep = Dependency::default();
    let svc = EnqueueFallbackLayer::with_config(queue.clone(), config)
        .unwrap()
        .layer(dep.service(|| Ok(respond(503, "down"))));
    (queue, dep, svc)
}

/// The error of a call answered by `answer` that a full queue could not defer, and the
/// dependency that saw it.
async fn refused_by_a_full_queue(
    answer: impl Fn() -> Result<Res, BoxError> + Clone + Send + Sync + 'static,
) -> (BoxError, Dependency) {
    let queue = Arc::new(MemoryQueue::with_capacity(0));
    let (out, dep) = defer_with(&queue, answer).await;
    (out.unwrap_err(), dep)
}

async fn defer_with(
    queue: &Arc<MemoryQueue>,
    answer: impl Fn() -> Result<Res, BoxError> + Clone + Send + Sync + 'static,
) -> (Result<Res, BoxError>, Dependency) {
    defer_configured(queue, EnqueueConfig::new(), answer).await
}

/// [`defer_with`], with `config`.
async fn defer_configured(
    queue: &Arc<MemoryQueue>,
    config: EnqueueConfig,
    answer: impl Fn() -> Result<Res, BoxError> + Clone + Send + Sync + 'static,
) -> (Result<Res, BoxError>, Dependency) {
    let dep = Dependency::default();
    let svc = EnqueueFallbackLayer::with_config(queue.clone(), config)
        .unwrap()
        .layer(dep.service(answer));
    let out = svc
        .oneshot(post("http://api.test/orders", "{\"sku\":1}"))
        .await;
    (out, dep)
}

// === triggers ===

#[tokio::test(start_paused = true)]
async fn circuit_open_enqueues_once_not_before_the_breaker_retry_after() {
    let queue = Arc::new(MemoryQueue::new());
    let (out, dep) = defer_with(&queue, || Err(boxed(Open::new(Duration::from_secs(30))))).await;
    let res = out.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(dep.calls(), 1);
    assert_eq!(depth(&queue).await.pending, 1);
    let env = queue.get(receipt_id(&res)).unwrap();
    assert_eq!(env.reason, DeferReason::CircuitOpen);
    assert_eq!(env.method, "POST");
    assert_eq!(env.uri, "http://api.test/orders");
    assert_eq!(env.destination, "api.test");
    assert_eq!(env.body, "{\"sku\":1}");
    assert_eq!(
        env.not_before.duration_since(env.created_at).unwrap(),
        Duration::from_secs(30)
    );
    assert!(env.expires_at.is_some());
}

#[tokio::test(start_paused = true)]
async fn bulkhead_full_enqueues_once() {
    let queue = Arc::new(MemoryQueue::new());
    let (out, _) = defer_with(&queue, || Err(boxed(BulkheadFull::new(4, 0)))).await;
    let res = out.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(
        queue.get(receipt_id(&res)).unwrap().reason,
        DeferReason::BulkheadFull
    );
    assert_eq!(depth(&queue).await.pending, 1);
}

#[tokio::test(start_paused = true)]
async fn deadline_elapsed_enqueues_once() {
    let queue = Arc::new(MemoryQueue::new());
    let (out, _) = defer_with(&queue, || {
        Err(boxed(DeadlineExceeded::new(Duration::from_secs(2), false)))
    })
    .await;
    let res = out.unwrap();
    assert_eq!(
        queue.get(receipt_id(&res)).unwrap().reason,
        DeferReason::DeadlineElapsed
    );
    assert_eq!(depth(&queue).await.pending, 1);
}

#[tokio::test(start_paused = true)]
async fn overload_with_retry_after_enqueues_not_before_the_hint() {
    let queue = Arc::new(MemoryQueue::new());
    let (out, _) = defer_with(&queue, || {
        let mut res = respond(429, "slow down");
        res.headers_mut()
            .insert(http::header::RETRY_AFTER, "120".parse().unwrap());
        Ok(res)
    })
    .await;
    let res = out.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let env = queue.get(receipt_id(&res)).unwrap();
    assert_eq!(env.reason, DeferReason::RetriesExhausted);
    assert_eq!(
        env.not_before.duration_since(env.created_at).unwrap(),
        Duration::from_secs(120)
    );
}

fn too_many_requests(retry_after: &str) -> Res {
    let mut res = respond(429, "slow down");
    res.headers_mut()
        .insert(http::header::RETRY_AFTER, retry_after.parse().unwrap());
    res
}

/// A dependency's `Retry-After` is honoured up to `max_retry_after` (an hour by
/// default): a 48 h hint (or an absurd one) is stored an hour ahead, within the
/// message's 24 h expiry, so it is deferred.
#[tokio::test(start_paused = true)]
async fn a_long_retry_after_is_capped_at_max_retry_after() {
    for (config, want) in [
        (EnqueueConfig::new(), Duration::from_secs(3600)),
        (
            EnqueueConfig::new().max_retry_after(Duration::from_secs(90)),
            Duration::from_secs(90),
        ),
    ] {
        for hint in [(48 * 3600).to_string(), u64::MAX.to_string()] {
            let queue = Arc::new(MemoryQueue::new());
            let (out, _) =
                defer_configured(&queue, config.clone(), move || Ok(too_many_requests(&hint)))
                    .await;
            let res = out.unwrap();
            assert_eq!(res.status(), StatusCode::ACCEPTED);
            let env = queue.get(receipt_id(&res)).unwrap();
            assert_eq!(env.not_before.duration_since(env.created_at).unwrap(), want);
        }
    }
}

/// A dependency's 429 whose Retry-After (up to `max_retry_after`) is past the message's
/// expiry is not deferred: a receipt would promise a delivery that can never happen.
/// The caller gets the 429 itself, with its Retry-After.
#[tokio::test(start_paused = true)]
async fn a_retry_after_past_the_expiry_is_not_deferred() {
    let uncapped = EnqueueConfig::new().max_retry_after(Duration::MAX);
    for retry_after in [(48 * 3600).to_string(), u64::MAX.to_string()] {
        let queue = Arc::new(MemoryQueue::new());
        let hint = retry_after.clone();
        let (out, _) = defer_configured(&queue, uncapped.clone(), move || {
            Ok(too_many_requests(&hint))
        })
        .await;
        let res = out.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            res.headers()[http::header::RETRY_AFTER],
            retry_after.as_str()
        );
        assert_eq!(depth(&queue).await, Depth::default());
    }
}

/// A call that failed after the message's time to live (no Retry-After) is not
/// deferred: the stored message would be dead-lettered unsent, after a receipt.
#[tokio::test(start_paused = true)]
async fn a_call_failing_past_the_expiry_is_not_deferred() {
    let queue = Arc::new(MemoryQueue::new());
    let slow = service_fn(|_req: InnerReq| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Err::<Res, BoxError>(boxed(DeadlineExceeded::new(Duration::from_secs(30), false)))
    });
    let svc = EnqueueFallbackLayer::with_config(
        queue.clone(),
        EnqueueConfig::new().ttl(Duration::from_secs(10)),
    )
    .unwrap()
    .layer(slow);
    let out = svc
        .oneshot(post("http://api.test/orders", "{\"sku\":1}"))
        .await;
    assert!(
        find_cause::<DeadlineExceeded>(&*out.unwrap_err()).is_some(),
        "the original error, not a receipt"
    );
    assert_eq!(depth(&queue).await, Depth::default());
}

/// Without an expiry or a cap, a Retry-After of any size is stored far in the future,
/// without panicking on overflow.
#[tokio::test(start_paused = true)]
async fn an_overflowing_retry_after_enqueues_far_in_the_future_without_panicking() {
    let queue = Arc::new(MemoryQueue::new());
    let dep = Dependency::default();
    let config = EnqueueConfig::new()
        .no_expiry()
        .max_retry_after(Duration::MAX);
    let svc = EnqueueFallbackLayer::with_config(queue.clone(), config)
        .unwrap()
        .layer(dep.service(|| {
            let mut res = respond(429, "slow down");
            res.headers_mut().insert(
                http::header::RETRY_AFTER,
                u64::MAX.to_string().parse().unwrap(),
            );
            Ok(res)
        }));
    let res = svc
        .oneshot(post("http://api.test/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let env = queue.get(receipt_id(&res)).unwrap();
    let wait = env.not_before.duration_since(env.created_at).unwrap();
    assert!(
        wait > Duration::from_secs(100 * 365 * 24 * 3600),
        "{wait:?}"
    );
}

/// A ttl too large for the clock saturates instead of panicking.
#[tokio::test(start_paused = true)]
async fn a_huge_ttl_does_not_panic() {
    let (queue, _dep, svc) = over_a_failing_dependency(EnqueueConfig::new().ttl(Duration::MAX));
    let res = svc
        .oneshot(post("http://api.test/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert!(queue.get(receipt_id(&res)).unwrap().expires_at.is_some());
}

/// Retries `n` times on a 5xx or an error (a stand-in for postbox's retry layer).
#[derive(Clone)]
struct RetryN(usize);

impl tower::retry::Policy<InnerReq, Res, BoxError> for RetryN {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut InnerReq,
        result: &mut Result<Res, BoxError>,
    ) -> Option<Self::Future> {
        let failed = result
            .as_ref()
            .map_or(true, |r| r.status().is_server_error());
        (failed && self.0 > 0).then(|| {
            self.0 -= 1;
            std::future::ready(())
        })
    }

    fn clone_request(&mut self, req: &InnerReq) -> Option<InnerReq> {
        let mut clone = Request::new(BufferedBody::full(req.body().as_bytes()?.clone()));
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.headers_mut() = req.headers().clone();
        Some(clone)
    }
}

#[tokio::test(start_paused = true)]
async fn retries_exhausted_enqueues_one_message_not_one_per_attempt() {
    let queue = Arc::new(MemoryQueue::new());
    let dep = Dependency::default();
    let svc = ServiceBuilder::new()
        .layer(EnqueueFallbackLayer::new(queue.clone()))
        .layer(tower::retry::RetryLayer::new(RetryN(3)))
        .service(dep.service(|| Ok(respond(503, "down"))));
    let res = svc
        .oneshot(post("http://api.test/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(dep.calls(), 4, "1 attempt + 3 retries");
    assert_eq!(
        depth(&queue).await.pending,
        1,
        "one message for the whole call"
    );
    let keys = dep.keys();
    assert!(
        keys.iter().all(|k| k.is_some() && *k == keys[0]),
        "every attempt carries one key"
    );
    let env = queue.get(receipt_id(&res)).unwrap();
    assert_eq!(env.reason, DeferReason::RetriesExhausted);
    assert_eq!(Some(env.idempotency_key), keys[0]);
}

// === never-cases ===

#[tokio::test(start_paused = true)]
async fn client_error_is_returned_unchanged_and_never_enqueued() {
    let queue = Arc::new(MemoryQueue::new());
    let (out, _) = defer_with(&queue, || Ok(respond(422, "bad sku"))).await;
    let res = out.unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bytes_of(res.into_body()).await, "bad sku");
    assert_eq!(depth(&queue).await, Depth::default());
}

#[tokio::test(start_paused = true)]
async fn success_is_returned_unchanged() {
    let queue = Arc::new(MemoryQueue::new());
    let (out, _) = defer_with(&queue, || Ok(respond(201, "created"))).await;
    assert_eq!(out.unwrap().status(), StatusCode::CREATED);
    assert_eq!(depth(&queue).await, Depth::default());
}

#[tokio::test(start_paused = true)]
async fn cancelled_call_never_enqueues() {
    let queue = Arc::new(MemoryQueue::new());
    let dep = Dependency::default();
    let slow = dep.service(|| Err(boxed(Open::new(Duration::ZERO))));
    let slow = service_fn(move |req: InnerReq| {
        let mut slow = slow.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            slow.call(req).await
        }
    });
    let mut svc = EnqueueFallbackLayer::new(queue.clone()).layer(slow);
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let mut fut = task::spawn(svc.call(post("http://api.test/orders", "{}")));
    assert_pending!(fut.poll());
    drop(fut); // the caller gave up
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(depth(&queue).await, Depth::default());
    assert_eq!(dep.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn get_is_not_enqueued_by_default() {
    let queue = Arc::new(MemoryQueue::new());
    let dep = Dependency::default();
    let svc = EnqueueFallbackLayer::new(queue.clone())
        .layer(dep.service(|| Err(boxed(Open::new(Duration::from_secs(1))))));
    let req = Request::get("http://api.test/orders/1")
        .body(Full::default())
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    assert!(
        find_cause::<Open>(&*err).is_some(),
        "the original error, unchanged"
    );
    assert_eq!(depth(&queue).await, Depth::default());
    assert_eq!(
        dep.keys(),
        [None],
        "a synchronous request is not stamped with a key"
    );
}

/// A `GET` the policy keeps synchronous reaches the layers inside with a body a retry
/// can send again (before, its empty body was "streamed" and never retried).
#[tokio::test(start_paused = true)]
async fn a_synchronous_get_is_retried_by_a_retry_layer_inside() {
    let queue = Arc::new(MemoryQueue::new());
    let dep = Dependency::default();
    let retry = postbox::retry::RetryLayer::http()
        .max_retries(2)
        .no_budget()
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(EnqueueFallbackLayer::new(queue.clone()))
        .layer(retry)
        .service(dep.service(|| Ok(respond(503, "down"))));
    let req = Request::get("http://api.test/orders/1")
        .body(Full::default())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(dep.calls(), 3, "the first attempt and two retries");
    assert_eq!(depth(&queue).await, Depth::default());
}

/// A `CONNECT` (any 2xx tells the client its tunnel is open) and a request asking for
/// an `Upgrade` are never deferred, even by a policy deferring everything: the
/// failure reaches the caller, and nothing is stored.
#[tokio::test(start_paused = true)]
async fn a_tunnel_or_an_upgrade_is_never_deferred() {
    let queue = Arc::new(MemoryQueue::new());
    let dep = Dependency::default();
    let config = EnqueueConfig::new().policy(DeferPolicy::defer_all());
    let svc = EnqueueFallbackLayer::with_config(queue.clone(), config)
        .unwrap()
        .layer(dep.service(|| Err(boxed(Open::new(Duration::from_secs(1))))));
    let connect = Request::connect("api.test:443")
        .body(Full::default())
        .unwrap();
    assert!(svc.clone().oneshot(connect).await.is_err());
    let mut upgrade = post("http://api.test/ws", "");
    let h = upgrade.headers_mut();
    h.insert("upgrade", "websocket".parse().unwrap());
    h.insert("connection", "keep-alive, Upgrade".parse().unwrap());
    assert!(svc.clone().oneshot(upgrade).await.is_err());
    assert_eq!(depth(&queue).await.pending, 0);
    // The same policy defers a plain POST, and one whose `Upgrade` is curl's `h2c` or
    // not named by `Connection` (both answered as plain requests).
    let res = svc
        .clone()
        .oneshot(post("http://api.test/ws", ""))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    for (upgrade, connection) in [("h2c", "Upgrade, HTTP2-Settings"), ("websocket", "close")] {
        let mut req = post("http://api.test/ws", "");
        let h = req.headers_mut();
        h.insert("upgrade", upgrade.parse().unwrap());
        h.insert("connection", connection.parse().unwrap());
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::ACCEPTED,
            "{upgrade} / {connection}"
        );
    }
    // The codec the typed flavour uses for HTTP does not capture them either.
    let codec = postbox::enqueue::HttpCodec::new();
    let tunnel: InnerReq = Request::connect("api.test:443")
        .body(BufferedBody::empty())
        .unwrap();
    assert!(codec.capture(&tunnel).is_none());
    let upgrade: InnerReq = Request::get("http://api.test/ws")
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .body(BufferedBody::empty())
        .unwrap();
    assert!(codec.capture(&upgrade).is_none());
    let plain: InnerReq = Request::get("http://api.test/ws")
        .body(BufferedBody::empty())
        .unwrap();
    assert!(codec.capture(&plain).is_some());
}

/// A key this layer cannot read (bytes outside visible ASCII) is not replaced with one
/// of its own: a receiver comparing raw bytes would take the caller's own retry for
/// another request. The request goes out as it is, and is not deferred.
#[tokio::test(start_paused = true)]
async fn a_key_that_cannot_be_read_is_sent_as_given_and_not_deferred() {
    let key = http::HeaderValue::from_bytes(b"order-\xc3\xa4-42").unwrap();
    let (queue, dep, svc) = over_a_failing_dependency(EnqueueConfig::new());
    let mut req = post("http://api.test/orders", "{}");
    req.headers_mut()
        .insert(IDEMPOTENCY_KEY_HEADER, key.clone());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(dep.seen.lock().unwrap()[0].1.as_deref(), Some("order-ä-42"));
    assert_eq!(depth(&queue).await, Depth::default());
    // The codec the typed flavour uses for HTTP does not capture it either.
    let codec = postbox::enqueue::HttpCodec::new();
    let mut req: InnerReq = Request::post("http://api.test/orders")
        .body(BufferedBody::empty())
        .unwrap();
    req.headers_mut().insert(IDEMPOTENCY_KEY_HEADER, key);
    assert!(codec.capture(&req).is_none());
}

#[tokio::test(start_paused = true)]
async fn policy_keeps_routes_synchronous_and_can_defer_reads() {
    let queue = Arc::new(MemoryQueue::new());
    let dep = Dependency::default();
    let config = EnqueueConfig::new().policy(
        DeferPolicy::new()
            .defer_method("GET")
            .keep_sync_route("/payments/"),
    );
    let svc = EnqueueFallbackLayer::with_config(queue.clone(), config)
        .unwrap()
        .layer(dep.service(|| Err(boxed(Open::new(Duration::from_secs(1))))));
    let pay = svc
        .clone()
        .oneshot(post("http://api.test/payments/9", "{}"))
        .await;
    assert!(pay.is_err());
    let get = Request::get("http://api.test/reports")
        .body(Full::default())
        .unwrap();
    assert_eq!(
        svc.oneshot(get).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(depth(&queue).await.pending, 1);
}

/// A body over the limit is streamed through, not enqueued, and goes out without a
/// key the fallback made (a key makes a request retry-safe for a retry outside: one
/// that can never be deferred was sent with one, and a server that ignores keys could
/// apply it twice).
#[tokio::test(start_paused = true)]
async fn body_over_limit_streams_through_and_is_not_enqueued() {
    let queue = Arc::new(MemoryQueue::new());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let inner = service_fn(move |req: Request<BufferedBody<Chunked>>| {
        let seen = seen2.clone();
        async move {
            assert!(!req.body().is_buffered());
            assert!(
                req.headers().get("idempotency-key").is_none(),
                "a key was made for a request that cannot be deferred"
            );
            let len = bytes_of(req.into_body()).await.len();
            seen.lock().unwrap().push(len);
            Err::<Res, _>(boxed(Open::new(Duration::from_secs(1))))
        }
    });
    let config = EnqueueConfig::new().max_body(1000);
    let svc = EnqueueFallbackLayer::with_config(queue.clone(), config)
        .unwrap()
        .layer(inner);
    // No size hint: read until the limit is crossed, then streamed through whole.
    let req = Request::post("http://api.test/upload")
        .body(Chunked::new(10, 300))
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    assert!(find_cause::<Open>(&*err).is_some());
    assert_eq!(*seen.lock().unwrap(), [3000]);
    assert_eq!(depth(&queue).await, Depth::default());
}

/// A Connect-protocol stream (`application/connect+proto`) is not deferred either, nor
/// its body read first: like a gRPC stream's, it may end only after its answer begins,
/// and the call hung. Nor a Connect unary call.
#[tokio::test(start_paused = true)]
async fn a_connect_stream_is_never_deferred_and_its_body_never_read_first() {
    let res = a_stream_through_the_fallback(
        "http://api.test/chat.Chat/Talk",
        "application/connect+proto",
        || respond(503, ""),
    )
    .await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // A Connect unary call neither: its client reads a `202` as an error.
    let (queue, _dep, svc) = over_a_failing_dependency(EnqueueConfig::new());
    let mut req = post("http://api.test/chat.Chat/Say", "{}");
    req.headers_mut()
        .insert("connect-protocol-version", "1".parse().unwrap());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(depth(&queue).await, Depth::default());
}

/// The caller's upload breaking after the fallback's limit (streamed through, not
/// deferrable) reaches the stack inside as `RequestBodyFailed`, which its breakers
/// ignore and its retry does not repeat: it was the raw `io::Error`, a failure of the
/// dependency that may have taken effect.
#[tokio::test(start_paused = true)]
async fn an_upload_that_breaks_past_the_limit_fails_as_the_callers() {
    let inner = service_fn(|req: Request<BufferedBody<BreaksAfter>>| async move {
        let err = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap_err();
        Err::<Res, BoxError>(err)
    });
    a_broken_upload_fails_as_the_callers(EnqueueConfig::new().max_body(1), inner).await;
}

/// The same for an upload that breaks while the fallback reads it to keep it (within
/// the limit): the caller's failure, `RequestBodyFailed`, ignored by a breaker or retry
/// outside; it came out raw (a `ConnectionReset` read as the dependency's failure).
#[tokio::test(start_paused = true)]
async fn an_upload_that_breaks_while_it_is_read_to_be_kept_fails_as_the_callers() {
    let inner = service_fn(|_req: Request<BufferedBody<BreaksAfter>>| async move {
        Ok::<Res, BoxError>(respond(201, "never called"))
    });
    a_broken_upload_fails_as_the_callers(EnqueueConfig::new(), inner).await;
}

/// Sends an upload that breaks after its first two bytes through a fallback (`config`)
/// over `inner`: the call fails as the caller's (`RequestBodyFailed`, ignored), and
/// nothing is stored.
async fn a_broken_upload_fails_as_the_callers<S>(config: EnqueueConfig, inner: S)
where
    S: Service<Request<BufferedBody<BreaksAfter>>, Response = Res, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let queue = Arc::new(MemoryQueue::new());
    let svc = EnqueueFallbackLayer::with_config(queue.clone(), config)
        .unwrap()
        .layer(inner);
    let req = Request::post("http://api.test/upload")
        .body(BreaksAfter(Some(Bytes::from_static(b"ab"))))
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    assert!(
        find_cause::<postbox::http::body::RequestBodyFailed>(&*err).is_some(),
        "{err}"
    );
    assert!(postbox::classify::classify_error(&*err).is_ignored());
    assert_eq!(depth(&queue).await, Depth::default());
}

/// The request goes out telling the next hop the time left once its body was read,
/// not when a `DeadlineLayer::http` outside wrote the header: a slow upload took
/// 800 ms of the second.
#[tokio::test(start_paused = true)]
async fn a_request_tells_the_time_left_after_its_body_was_read() {
    let queue = Arc::new(MemoryQueue::new());
    let told = Arc::new(Mutex::new(Vec::new()));
    let inner = service_fn({
        let told = told.clone();
        move |req: Request<BufferedBody<Delayed>>| {
            told.lock().unwrap().push(
                req.headers()[postbox::timeout::TIMEOUT_MS_HEADER]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
            async { Ok::<Res, BoxError>(respond(201, "created")) }
        }
    });
    let svc = EnqueueFallbackLayer::new(queue).layer(inner);
    let mut req = Request::post("http://api.test/orders")
        .body(Delayed::new(Duration::from_millis(800), b"{}"))
        .unwrap();
    req.extensions_mut()
        .insert(postbox::timeout::CallDeadline::new(
            tokio::time::Instant::now() + Duration::from_secs(1),
        ));
    req.headers_mut()
        .insert(postbox::timeout::TIMEOUT_MS_HEADER, 1000.into());
    svc.oneshot(req).await.unwrap();
    assert_eq!(*told.lock().unwrap(), ["200"]);
}

/// A gRPC call is never deferred: it goes straight through, its body streamed (a
/// streaming call's body ends only after the answer begins: read first to be stored,
/// the call hung), and its failure comes back as it was, not as a `202`, which no gRPC
/// client can read.
#[tokio::test(start_paused = true)]
async fn a_grpc_call_is_never_deferred_and_its_body_never_read_first() {
    let res = a_stream_through_the_fallback(
        "http://api.test/orders.Orders/Watch",
        "application/grpc",
        || {
            let mut res = Response::new(Full::default());
            res.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            res.headers_mut()
                .insert("grpc-status", "14".parse().unwrap());
            res
        },
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "14");
}

/// A streaming call to `uri` with `content_type` through the HTTP fallback, its body
/// one message that never ends: checks it reaches the dependency unread (within a
/// minute, not hung on the body) and is not stored; returns the answer, `answer()`.
async fn a_stream_through_the_fallback(uri: &str, content_type: &str, answer: fn() -> Res) -> Res {
    let queue = Arc::new(MemoryQueue::new());
    let inner = service_fn(move |req: Request<BufferedBody<NeverEnds>>| async move {
        assert!(!req.body().is_buffered());
        Ok::<Res, BoxError>(answer())
    });
    let svc = EnqueueFallbackLayer::new(queue.clone()).layer(inner);
    let req = Request::post(uri)
        .header("content-type", content_type)
        .body(NeverEnds(Some(Bytes::from_static(b"\0\0\0\0\0"))))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(60), svc.oneshot(req))
        .await
        .expect("the call waited for the body to end")
        .unwrap();
    assert_eq!(depth(&queue).await, Depth::default());
    res
}

#[tokio::test(start_paused = true)]
async fn body_with_known_size_over_limit_is_not_read_ahead() {
    let (queue, dep, svc) = over_a_failing_dependency(EnqueueConfig::new().max_body(4));
    let res = svc
        .oneshot(post("http://api.test/orders", "0123456789"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(dep.seen.lock().unwrap()[0].2, "0123456789");
    assert_eq!(dep.seen.lock().unwrap()[0].1, None, "no key made for it");
    assert_eq!(depth(&queue).await, Depth::default());

    // A body that says it is 10 bytes and sends nothing yet: the call goes out at
    // once, the body unread (read ahead, the call would wait for bytes that the
    // server, say, sends only after its answer began).
    let queue = Arc::new(MemoryQueue::new());
    let inner = service_fn(|req: Request<BufferedBody<SaysTen>>| async move {
        assert!(!req.body().is_buffered());
        Ok::<Res, BoxError>(respond(503, "down"))
    });
    let svc = EnqueueFallbackLayer::with_config(queue.clone(), EnqueueConfig::new().max_body(4))
        .unwrap()
        .layer(inner);
    let req = Request::post("http://api.test/orders")
        .body(SaysTen)
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(60), svc.oneshot(req))
        .await
        .expect("the body was read ahead")
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(depth(&queue).await, Depth::default());
}

/// A request that cannot be deferred (its body over `max_body`, known from its size or
/// found while reading it) goes out with its headers as they came, every key it was
/// given included: only a request the layer may defer is sent with the one key it is
/// stored under. (Its second key was dropped.)
#[tokio::test(start_paused = true)]
async fn a_request_over_the_limit_keeps_every_key_it_was_given() {
    fn with_two_keys<B>(req: &mut Request<B>) {
        req.headers_mut()
            .append(IDEMPOTENCY_KEY_HEADER, "a".parse().unwrap());
        req.headers_mut()
            .append(IDEMPOTENCY_KEY_HEADER, "b".parse().unwrap());
    }
    let (queue, dep, svc) = over_a_failing_dependency(EnqueueConfig::new().max_body(4));
    let mut req = post("http://api.test/orders", "0123456789");
    with_two_keys(&mut req);
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(dep.seen.lock().unwrap()[0].1.as_deref(), Some("a, b"));
    assert_eq!(depth(&queue).await, Depth::default());

    // Found over the limit while it was read (no size known ahead).
    let keys = Arc::new(Mutex::new(Vec::new()));
    let seen = keys.clone();
    let inner = service_fn(move |req: Request<BufferedBody<Frames>>| {
        let keys: Vec<_> = req
            .headers()
            .get_all(IDEMPOTENCY_KEY_HEADER)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        seen.lock().unwrap().push(keys);
        async move { Ok::<Res, BoxError>(respond(503, "down")) }
    });
    let queue = Arc::new(MemoryQueue::new());
    let svc = EnqueueFallbackLayer::with_config(queue.clone(), EnqueueConfig::new().max_body(4))
        .unwrap()
        .layer(inner);
    let frames: Vec<_> = ["012", "345", "6789"]
        .iter()
        .map(|p| Ok(http_body::Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    let mut req = Request::post("http://api.test/orders")
        .body(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
        .unwrap();
    with_two_keys(&mut req);
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(*keys.lock().unwrap(), [vec!["a", "b"]]);
    assert_eq!(depth(&queue).await, Depth::default());
}

/// A body whose size hint says 10 bytes, none of which ever come.
struct SaysTen;

impl http_body::Body for SaysTen {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Pending
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(10)
    }
}

/// A dependency whose readiness is whatever `F` says, and whose calls answer `200`.
#[derive(Clone)]
struct Readiness<F>(F);

impl<F> Service<InnerReq> for Readiness<F>
where
    F: FnMut() -> std::task::Poll<Result<(), BoxError>>,
{
    type Response = Res;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Res, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        (self.0)()
    }

    fn call(&mut self, _: InnerReq) -> Self::Future {
        std::future::ready(Ok(respond(200, "")))
    }
}

/// A service that fails to become ready (a `Reconnect` that cannot connect, a closed
/// `Buffer`) with a failure that triggers a deferral: the request is deferred, as if
/// its call had failed so (nothing was sent).
#[tokio::test(start_paused = true)]
async fn a_readiness_failure_defers_like_a_failed_call() {
    let unreachable = Readiness(|| {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        std::task::Poll::Ready(Err(refused.into()))
    });
    let queue = Arc::new(MemoryQueue::new());
    let svc = EnqueueFallbackLayer::new(queue.clone()).layer(unreachable);
    let res = svc
        .oneshot(post("http://api.test/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(depth(&queue).await.pending, 1);
}

/// A request body that is either whole or never sends anything (a stalled upload).
struct MaybeStalled(Option<Full<Bytes>>);

impl http_body::Body for MaybeStalled {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().0 {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => std::task::Poll::Pending,
        }
    }
}

/// Reading a slow upload holds nothing of the layers inside: with a bulkhead of one
/// inside the fallback, another request still reaches the dependency instead of being
/// deferred as `bulkhead full` (the upload's `poll_ready` reserved the only permit).
#[tokio::test(start_paused = true)]
async fn a_slow_request_body_does_not_hold_a_bulkhead_permit() {
    let queue = Arc::new(MemoryQueue::new());
    let inner = service_fn(|_: Request<BufferedBody<MaybeStalled>>| async {
        Ok::<_, BoxError>(respond(201, "created"))
    });
    let bulkhead = postbox::bulkhead::BulkheadLayer::new(1).unwrap();
    let svc = EnqueueFallbackLayer::new(queue.clone()).layer(bulkhead.layer(inner));
    let stalled = Request::post("http://api.test/orders")
        .body(MaybeStalled(None))
        .unwrap();
    let mut upload = task::spawn(svc.clone().oneshot(stalled));
    assert_pending!(upload.poll());
    let whole = Request::post("http://api.test/orders")
        .body(MaybeStalled(Some(Full::from("{}"))))
        .unwrap();
    let res = svc.clone().oneshot(whole).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::CREATED,
        "the upload held the bulkhead"
    );
    assert_eq!(depth(&queue).await, Depth::default());
    assert_pending!(upload.poll());
}

// === durability, receipts, keys ===

#[tokio::test(start_paused = true)]
async fn queue_failure_returns_an_error_carrying_both_failures() {
    let (err, _) = refused_by_a_full_queue(|| Err(boxed(Open::new(Duration::from_secs(5))))).await;
    let not = err.downcast_ref::<NotEnqueued>().expect("NotEnqueued");
    assert!(matches!(
        not.queue_error(),
        QueueError::Full { capacity: 0 }
    ));
    assert_eq!(not.reason(), DeferReason::CircuitOpen);
    assert!(
        find_cause::<Open>(&*err).is_some(),
        "the original failure is the source"
    );
    let text = err.to_string();
    assert!(
        text.contains("queue full") && text.contains("circuit open"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_response_that_cannot_be_stored_is_an_error_not_a_receipt() {
    let (err, _) = refused_by_a_full_queue(|| Ok(respond(502, "bad gateway"))).await;
    let not = err.downcast_ref::<NotEnqueued>().unwrap();
    assert!(not.original().to_string().contains("502"));
}

/// A request that failed and could not be deferred names the key its attempts carried
/// (generated by the layer here): the caller's own retry sends it, so the receiver runs
/// the request at most once although the failed attempt may have taken effect.
#[tokio::test(start_paused = true)]
async fn a_request_that_could_not_be_deferred_names_the_key_its_attempts_carried() {
    let (err, dep) = refused_by_a_full_queue(|| Ok(respond(503, "down"))).await;
    let not = err.downcast_ref::<NotEnqueued>().unwrap();
    let sent = dep.keys()[0].clone().expect("the attempt carried a key");
    assert_eq!(not.idempotency_key(), Some(sent.as_str()));
}

#[tokio::test(start_paused = true)]
async fn receipt_is_202_with_the_documented_headers() {
    let queue = Arc::new(MemoryQueue::new());
    let dep = Dependency::default();
    let svc = EnqueueFallbackLayer::new(queue.clone())
        .layer(dep.service(|| Err(boxed(Open::new(Duration::from_secs(1))))));
    let mut req = post("http://api.test/orders", "{}");
    req.headers_mut()
        .insert(IDEMPOTENCY_KEY_HEADER, "order-7".parse().unwrap());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let id = res.headers()[MESSAGE_ID_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(res.headers()[IDEMPOTENCY_KEY_HEADER], "order-7");
    assert_eq!(res.headers()[DEFER_REASON_HEADER], "circuit-open");
    assert_eq!(id, receipt_id(&res).to_string());
    assert_eq!(id.len(), 36);
    let env = queue.get(receipt_id(&res)).unwrap();
    assert_eq!(env.idempotency_key, "order-7");
    assert!(bytes_of(res.into_body()).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn idempotency_key_is_sent_on_the_original_attempt() {
    let (queue, dep, svc) = over_a_failing_dependency(EnqueueConfig::new());
    let res = svc
        .clone()
        .oneshot(post("http://api.test/orders", "{}"))
        .await
        .unwrap();
    let sent = dep.keys()[0]
        .clone()
        .expect("a generated key on the first attempt");
    assert_eq!(res.headers()[IDEMPOTENCY_KEY_HEADER], sent.as_str());
    assert_eq!(queue.get(receipt_id(&res)).unwrap().idempotency_key, sent);

    let mut req = post("http://api.test/orders", "{}");
    req.headers_mut()
        .insert(IDEMPOTENCY_KEY_HEADER, "mine".parse().unwrap());
    svc.oneshot(req).await.unwrap();
    assert_eq!(
        dep.keys()[1].as_deref(),
        Some("mine"),
        "the caller's key is reused"
    );
}

/// The original call's deadline headers are not stored with the message: a replay,
/// hours later, has a deadline of its own.
#[tokio::test(start_paused = true)]
async fn the_original_deadline_headers_are_not_stored() {
    let (queue, _dep, svc) = over_a_failing_dependency(EnqueueConfig::new());
    let mut req = post("http://api.test/orders", "{}");
    req.headers_mut()
        .insert(postbox::timeout::TIMEOUT_MS_HEADER, 500.into());
    req.headers_mut()
        .insert("grpc-timeout", "500m".parse().unwrap());
    req.headers_mut()
        .insert("x-tenant", "acme".parse().unwrap());
    let res = svc.oneshot(req).await.unwrap();
    let env = queue.get(receipt_id(&res)).unwrap();
    let names: Vec<_> = env.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"x-tenant"), "{names:?}");
    assert!(!names.contains(&"postbox-timeout-ms"), "{names:?}");
    assert!(!names.contains(&"grpc-timeout"), "{names:?}");
}

/// Hop-by-hop headers are not stored: the fixed ones, `proxy-authorization`, and those
/// the `connection` header names. A stored credential is marked sensitive again when
/// the request is rebuilt.
#[tokio::test(start_paused = true)]
async fn hop_by_hop_headers_are_not_stored_and_credentials_replay_as_sensitive() {
    let (queue, _dep, svc) = over_a_failing_dependency(EnqueueConfig::new());
    let mut req = post("http://api.test/orders", "{}");
    let h = req.headers_mut();
    h.insert("connection", "keep-alive, X-Hop".parse().unwrap());
    h.insert("x-hop", "1".parse().unwrap());
    h.insert("proxy-authorization", "Basic cHJveHk=".parse().unwrap());
    h.insert("authorization", "Bearer secret-token".parse().unwrap());
    h.insert("cookie", "session=secret-cookie".parse().unwrap());
    h.insert("x-api-key", "secret-api-key".parse().unwrap());
    h.insert("x-tenant", "acme".parse().unwrap());
    let res = svc.oneshot(req).await.unwrap();
    let env = queue.get(receipt_id(&res)).unwrap();
    let mut names: Vec<_> = env.headers.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "authorization",
            "cookie",
            "idempotency-key",
            "x-api-key",
            "x-tenant"
        ]
    );
    let replay: InnerReq = postbox::enqueue::HttpCodec::new().rebuild(&env).unwrap();
    // The same names `Debug` redacts.
    for credential in ["authorization", "cookie", "x-api-key"] {
        assert!(replay.headers()[credential].is_sensitive(), "{credential}");
        assert!(!format!("{env:?}").contains(replay.headers()[credential].to_str().unwrap()));
    }
    assert!(!replay.headers()["x-tenant"].is_sensitive());
}

/// A request with the `Idempotency-Key` header twice goes out with the one key the
/// message is stored under, on the first attempt as on the replay. (Both values went
/// out first, and only the first on replay: a server taking the last value saw two
/// different keys for one request, and ran its effect twice.)
#[tokio::test(start_paused = true)]
async fn a_repeated_idempotency_key_header_goes_out_as_the_one_key_stored() {
    let (queue, dep, svc) = over_a_failing_dependency(EnqueueConfig::new());
    let mut req = post("http://api.test/orders", "{}");
    req.headers_mut()
        .append(IDEMPOTENCY_KEY_HEADER, "first".parse().unwrap());
    req.headers_mut()
        .append(IDEMPOTENCY_KEY_HEADER, "second".parse().unwrap());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(dep.keys()[0].as_deref(), Some("first"));
    let env = queue.get(receipt_id(&res)).unwrap();
    assert_eq!(env.idempotency_key, "first");
    let stored: Vec<_> = env
        .headers
        .iter()
        .filter(|(n, _)| n.as_str() == IDEMPOTENCY_KEY_HEADER)
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
}

/// A key sent in the IETF draft's quoted form goes out on the replay as it came, so the
/// receiver reads the same key from both: `"a\\"b"` is the key `a"b`, and sent bare,
/// `a\"b`, it would be another key (and a quoted key with spaces inside would lose them).
#[tokio::test(start_paused = true)]
async fn a_quoted_key_is_replayed_as_it_came() {
    for (sent, key) in [
        (r#""a\"b""#, r#"a"b"#),
        (r#"" k ""#, " k "),
        ("plain-7", "plain-7"),
    ] {
        let (queue, dep, svc) = over_a_failing_dependency(EnqueueConfig::new());
        let mut req = post("http://api.test/orders", "{}");
        req.headers_mut()
            .insert(IDEMPOTENCY_KEY_HEADER, sent.parse().unwrap());
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        assert_eq!(dep.keys()[0].as_deref(), Some(sent));
        let env = queue.get(receipt_id(&res)).unwrap();
        let replay: InnerReq = postbox::enqueue::HttpCodec::new().rebuild(&env).unwrap();
        let header = &replay.headers()[IDEMPOTENCY_KEY_HEADER];
        assert_eq!(header, sent);
        assert_eq!(env.idempotency_key, key);
        assert_eq!(postbox::http::idempotency_key::key_in(header).unwrap(), key);
    }
    // The queue de-duplicates on the key as read: the same request sent again with
    // the key spelt the other way is the message already held.
    let (queue, _dep, svc) = over_a_failing_dependency(EnqueueConfig::new());
    let mut ids = Vec::new();
    for spelt in [r#""order-7""#, "order-7"] {
        let mut req = post("http://api.test/orders", "{}");
        req.headers_mut()
            .insert(IDEMPOTENCY_KEY_HEADER, spelt.parse().unwrap());
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        ids.push(receipt_id(&res));
    }
    assert_eq!(ids[0], ids[1], "stored twice");
    assert_eq!(queue.get(ids[0]).unwrap().idempotency_key, "order-7");
    // The typed flavour's HTTP codec sets the key it stored on the first attempt: a
    // header that already reads as that key keeps its spelling; another is replaced.
    let codec = postbox::enqueue::HttpCodec::new();
    let mut req: InnerReq = Request::post("http://api.test/orders")
        .header(IDEMPOTENCY_KEY_HEADER, r#""a\"b""#)
        .body(BufferedBody::empty())
        .unwrap();
    let key = codec.idempotency_key(&req).unwrap();
    assert_eq!(key, r#"a"b"#);
    codec.set_idempotency_key(&mut req, &key);
    assert_eq!(req.headers()[IDEMPOTENCY_KEY_HEADER], r#""a\"b""#);
    codec.set_idempotency_key(&mut req, "other");
    assert_eq!(req.headers()[IDEMPOTENCY_KEY_HEADER], "other");
    // Sent twice to the typed flavour, the first value goes out alone too, as the
    // replay sends it: both went out, and a server reading the last value saw two keys.
    req.headers_mut()
        .append(IDEMPOTENCY_KEY_HEADER, "second".parse().unwrap());
    let key = codec.idempotency_key(&req).unwrap();
    codec.set_idempotency_key(&mut req, &key);
    let sent: Vec<_> = req
        .headers()
        .get_all(IDEMPOTENCY_KEY_HEADER)
        .iter()
        .collect();
    assert_eq!(sent, ["other"]);
    // Sent twice, the first value goes out alone, as it was spelt.
    let (queue, dep, svc) = over_a_failing_dependency(EnqueueConfig::new());
    let mut req = post("http://api.test/orders", "{}");
    req.headers_mut()
        .append(IDEMPOTENCY_KEY_HEADER, r#""a\"b""#.parse().unwrap());
    req.headers_mut()
        .append(IDEMPOTENCY_KEY_HEADER, "second".parse().unwrap());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(dep.keys()[0].as_deref(), Some(r#""a\"b""#));
    assert_eq!(
        queue.get(receipt_id(&res)).unwrap().idempotency_key,
        r#"a"b"#
    );
}

/// Credentials in the URI (`user:password@host`) go with the message, for the replay,
/// but not into its destination (broker headers every consumer reads, logs) nor into
/// `Debug` output.
#[tokio::test(start_paused = true)]
async fn uri_credentials_stay_out_of_the_destination_and_debug_output() {
    let (queue, _dep, svc) = over_a_failing_dependency(EnqueueConfig::new());
    let res = svc
        .oneshot(post("http://bob:hunter2@api.test:8080/orders?x=1", "{}"))
        .await
        .unwrap();
    let env = queue.get(receipt_id(&res)).unwrap();
    assert_eq!(env.destination, "api.test:8080");
    let replay: InnerReq = postbox::enqueue::HttpCodec::new().rebuild(&env).unwrap();
    assert_eq!(
        replay.uri().authority().unwrap().as_str(),
        "bob:hunter2@api.test:8080"
    );
    let shown = format!("{env:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains("http://<redacted>@api.test:8080/orders?x=1"),
        "{shown}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_empty_idempotency_key_is_replaced_by_a_generated_one() {
    let (queue, dep, svc) = over_a_failing_dependency(EnqueueConfig::new());
    let mut req = post("http://api.test/orders", "{}");
    req.headers_mut()
        .insert(IDEMPOTENCY_KEY_HEADER, "".parse().unwrap());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let sent = dep.keys()[0].clone().expect("a key on the first attempt");
    assert!(!sent.is_empty(), "the empty key was sent");
    assert_eq!(res.headers()[IDEMPOTENCY_KEY_HEADER], sent.as_str());
    assert_eq!(queue.get(receipt_id(&res)).unwrap().idempotency_key, sent);
}

// === typed flavour ===

#[derive(Debug, Clone, PartialEq)]
struct Command {
    key: Option<String>,
    text: String,
}

struct CommandCodec;

impl RequestCodec<Command> for CommandCodec {
    fn idempotency_key(&self, req: &Command) -> Option<String> {
        req.key.clone()
    }
    fn set_idempotency_key(&self, req: &mut Command, key: &str) {
        req.key = Some(key.to_owned());
    }
    fn capture(&self, req: &Command) -> Option<Captured> {
        Some(Captured {
            method: "RUN".into(),
            uri: "/commands".into(),
            body: Bytes::from(req.text.clone()),
            ..Captured::default()
        })
    }
    fn rebuild(&self, env: &Envelope) -> Result<Command, BoxError> {
        Ok(Command {
            key: Some(env.idempotency_key.clone()),
            text: String::from_utf8(env.body.to_vec())?,
        })
    }
}

/// A codec that panics on messages whose URI ends in `/bad` (a user's `unwrap`).
struct PanicsOnBad;

impl RequestCodec<Command> for PanicsOnBad {
    fn idempotency_key(&self, req: &Command) -> Option<String> {
        CommandCodec.idempotency_key(req)
    }
    fn set_idempotency_key(&self, req: &mut Command, key: &str) {
        CommandCodec.set_idempotency_key(req, key);
    }
    fn capture(&self, req: &Command) -> Option<Captured> {
        CommandCodec.capture(req)
    }
    fn rebuild(&self, env: &Envelope) -> Result<Command, BoxError> {
        assert!(!env.uri.ends_with("/bad"), "cannot parse {}", env.uri);
        CommandCodec.rebuild(env)
    }
}

/// A codec that panics on one message does not end the replayer: that message is
/// dead-lettered, saying so, and the others are delivered.
#[tokio::test(start_paused = true)]
async fn a_codec_panicking_on_one_message_dead_letters_it_and_goes_on() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    enqueue_raw(&queue, "http://api.test/bad").await;
    enqueue_raw(&queue, "http://api.test/b").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let svc = service_fn(move |_: Command| {
        calls2.fetch_add(1, Ordering::SeqCst);
        async { Ok::<u32, BoxError>(1) }
    });
    let handle = Replayer::new(queue.clone(), svc, PanicsOnBad)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 2 && handle.stats().dead_lettered == 1).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let dead = Queue::dead_letters(&*queue, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].envelope.uri.ends_with("/bad"));
    assert!(
        dead[0].reason.contains("panicked: cannot parse"),
        "{}",
        dead[0].reason
    );
    handle.shutdown().await;
}

/// A blank typed key (which the server's `Idempotency` layer reads as none) is
/// replaced by a fresh one, as an empty key is: a replay carrying it would not be
/// de-duplicated. Any other key is kept: what a transport can carry is its codec's
/// business.
#[tokio::test(start_paused = true)]
async fn a_blank_typed_key_is_replaced() {
    for (given, kept) in [
        ("  ", false),
        ("\t", false),
        ("clé", true),
        ("order-42", true),
    ] {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let sent2 = sent.clone();
        let down = service_fn(move |cmd: Command| {
            sent2.lock().unwrap().push(cmd);
            async {
                Err::<u32, BoxError>(boxed(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                )))
            }
        });
        let svc = DeferLayer::new(Arc::new(MemoryQueue::new()), CommandCodec).layer(down);
        let cmd = Command {
            key: Some(given.into()),
            text: "reindex".into(),
        };
        let Deferred::Enqueued(receipt) = svc.oneshot(cmd).await.unwrap() else {
            panic!("expected a receipt")
        };
        let sent = sent.lock().unwrap()[0].key.clone().unwrap();
        assert_eq!(sent == given, kept, "{given:?} sent as {sent:?}");
        assert_eq!(receipt.idempotency_key(), sent);
    }
}

#[tokio::test(start_paused = true)]
async fn typed_flavour_returns_an_enqueued_outcome_and_replays_with_the_codec() {
    let queue = Arc::new(MemoryQueue::new());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let sent2 = sent.clone();
    let down = service_fn(move |cmd: Command| {
        sent2.lock().unwrap().push(cmd);
        async {
            Err::<u32, BoxError>(boxed(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )))
        }
    });
    let svc = DeferLayer::new(queue.clone(), CommandCodec).layer(down);
    let cmd = Command {
        key: None,
        text: "reindex".into(),
    };
    let out = svc.oneshot(cmd).await.unwrap();
    let Deferred::Enqueued(receipt) = out else {
        panic!("expected a receipt")
    };
    assert_eq!(receipt.reason(), DeferReason::RetriesExhausted);
    let key = sent.lock().unwrap()[0].key.clone().unwrap();
    assert_eq!(receipt.idempotency_key(), key);

    let delivered = Arc::new(Mutex::new(Vec::new()));
    let delivered2 = delivered.clone();
    let up = service_fn(move |cmd: Command| {
        delivered2.lock().unwrap().push(cmd);
        async { Ok::<u32, BoxError>(7) }
    });
    let handle = Replayer::new(queue.clone(), up, CommandCodec)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    handle.shutdown().await;
    assert_eq!(
        *delivered.lock().unwrap(),
        [Command {
            key: Some(key),
            text: "reindex".into()
        }]
    );
    assert_eq!(depth(&queue).await, Depth::default());
}

// === replayer ===

/// A server behind the Idempotency layer that applies orders; counts effects per key.
#[derive(Clone, Default)]
struct OrderServer {
    applied: Arc<Mutex<HashMap<String, usize>>>,
    handled: Arc<AtomicUsize>,
}

impl OrderServer {
    fn service(
        &self,
    ) -> impl Service<
        InnerReq,
        Response = Response<BufferedBody<Full<Bytes>>>,
        Error = BoxError,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let applied = self.applied.clone();
        let handled = self.handled.clone();
        let handler = service_fn(
            move |req: Request<FingerprintedBody<BufferedBody<Full<Bytes>>>>| {
                let applied = applied.clone();
                let handled = handled.clone();
                async move {
                    handled.fetch_add(1, Ordering::SeqCst);
                    let key = req.headers()[IDEMPOTENCY_KEY_HEADER]
                        .to_str()
                        .unwrap()
                        .to_owned();
                    *applied.lock().unwrap().entry(key).or_default() += 1;
                    Ok::<_, BoxError>(respond(201, "applied"))
                }
            },
        );
        IdempotencyLayer::new(100).layer(handler)
    }
}

/// The network between replayer and server: the first response for each key is lost
/// after the server applied the request.
fn lossy<S>(
    server: S,
) -> impl Service<InnerReq, Response = S::Response, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static
where
    S: Service<InnerReq, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
{
    let lost = Arc::new(Mutex::new(std::collections::HashSet::new()));
    service_fn(move |req: InnerReq| {
        let server = server.clone();
        let lost = lost.clone();
        async move {
            let key = req.headers()[IDEMPOTENCY_KEY_HEADER]
                .to_str()
                .unwrap()
                .to_owned();
            let res = server.oneshot(req).await?;
            if lost.lock().unwrap().insert(key) {
                return Err(boxed(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                )));
            }
            Ok(res)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn replayer_delivers_every_message_exactly_once_even_when_the_first_response_is_lost() {
    let queue = Arc::new(MemoryQueue::new());
    let down = Dependency::default();
    let client = EnqueueFallbackLayer::new(queue.clone())
        .layer(down.service(|| Err(boxed(Open::new(Duration::from_secs(2))))));
    let mut keys = Vec::new();
    for i in 0..5 {
        let body: &'static str = Box::leak(format!("{{\"order\":{i}}}").into_boxed_str());
        let res = client
            .clone()
            .oneshot(post("http://shop.test/orders", body))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        keys.push(
            res.headers()[IDEMPOTENCY_KEY_HEADER]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(depth(&queue).await.pending, 5);

    let server = OrderServer::default();
    let handle = Replayer::http(queue.clone(), lossy(server.service()))
        .jitter(false)
        .backoff(Duration::from_secs(1), Duration::from_secs(10))
        .concurrency(2)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 5).await;
    let stats = handle.shutdown().await;
    assert_eq!(stats.retried, 5, "each first response was lost");
    assert_eq!(stats.dead_lettered, 0);
    let applied = server.applied.lock().unwrap().clone();
    assert_eq!(applied.len(), 5);
    for key in &keys {
        assert_eq!(
            applied.get(key),
            Some(&1),
            "order {key} applied exactly once"
        );
    }
    assert_eq!(
        server.handled.load(Ordering::SeqCst),
        5,
        "duplicates answered from memory"
    );
    assert_eq!(depth(&queue).await, Depth::default());
}

/// A `POST` of `{}` to `uri` on `api.test`, deferred with the circuit open, due at once.
fn due_envelope(uri: &str) -> Envelope {
    let mut env = Envelope::new(
        "api.test",
        "POST",
        uri,
        Bytes::from_static(b"{}"),
        DeferReason::CircuitOpen,
    );
    env.not_before = SystemTime::UNIX_EPOCH;
    env
}

/// A due envelope for `http://{host}/{path}`, its destination `host`.
fn due_to(host: &str, path: &str) -> Envelope {
    let mut e = due_envelope(&format!("http://{host}/{path}"));
    e.destination = host.into();
    e
}

async fn enqueue_raw(queue: &MemoryQueue, uri: &str) -> MessageId {
    queue.enqueue(due_envelope(uri)).await.unwrap().id()
}

fn counting(
    status: u16,
    calls: Arc<AtomicUsize>,
) -> impl Service<InnerReq, Response = Res, Error = BoxError, Future: Send> + Clone + Send + 'static
{
    service_fn(move |_req: InnerReq| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(respond(status, "")) }
    })
}

/// A service that panics is judged a failure worth retrying: backed off like one and
/// dead-lettered after its attempts, saying it panicked. (Left to its lease, it came
/// back only after `lease_for` each time, and its dead letter said nothing of why.)
#[tokio::test(start_paused = true)]
async fn a_panicking_service_is_retried_with_backoff_and_its_dead_letter_says_why() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/orders").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = service_fn({
        let calls = calls.clone();
        move |_req: InnerReq| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if true {
                    panic!("index out of bounds");
                }
                Ok::<Res, BoxError>(respond(200, ""))
            }
        }
    });
    let started = tokio::time::Instant::now();
    let handle = Replayer::http(queue.clone(), svc)
        .max_attempts(2)
        .jitter(false)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().dead_lettered == 1).await;
    let stats = handle.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(stats.retried, 1);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "waited for the lease ({:?}) instead of the backoff",
        started.elapsed()
    );
    let dead = queue.dead_letters(10).await.unwrap();
    assert!(
        dead[0].reason.contains("panicked: index out of bounds"),
        "{}",
        dead[0].reason
    );
}

/// A config file's `[client.replay]` section sets the replayer: here two attempts,
/// not the default ten, before the dead letter. And its judge reads the stack's
/// `[client.classify]`: a `409` listed as a retryable failure (the fallback deferred it
/// as one) is retried on replay, not dead-lettered at once as a refusal.
#[cfg(feature = "config")]
#[tokio::test(start_paused = true)]
async fn a_replay_section_of_the_config_sets_the_replayer() {
    let config = postbox::config::ClientConfig::from_str(
        "[replay]\nmax_attempts = 2\njitter = false\nbackoff_base = \"10ms\"\n\
         [classify]\nretryable_failure = [409]\n",
        postbox::config::Format::Toml,
    )
    .unwrap();
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/orders").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let replayer = Replayer::http(queue.clone(), counting(409, calls.clone()));
    let handle = config.replayer(replayer).unwrap().spawn().unwrap();
    eventually(|| handle.stats().dead_lettered == 1).await;
    handle.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // A process that only replays (its own stack does not defer) still has its lease
    // checked against its deadline, here: replays cut off at 27 s of a 60 s call.
    let config = postbox::config::ClientConfig::from_str(
        "deadline = \"60s\"\n[replay]\nlease_for = \"30s\"\n",
        postbox::config::Format::Toml,
    )
    .unwrap();
    let replayer = Replayer::http(queue.clone(), counting(200, calls.clone()));
    let Err(e) = config.replayer(replayer) else {
        panic!("a lease shorter than the deadline was accepted");
    };
    assert_eq!(e.field(), "client.replay.lease_for");
}

#[tokio::test(start_paused = true)]
async fn replayer_dead_letters_after_max_attempts() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/orders").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = Replayer::http(queue.clone(), counting(503, calls.clone()))
        .max_attempts(3)
        .jitter(false)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().dead_lettered == 1).await;
    handle.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].reason.contains("3 attempts"), "{}", dead[0].reason);
    assert_eq!(
        depth(&queue).await,
        Depth {
            pending: 0,
            in_flight: 0,
            dead: 1
        }
    );
}

#[tokio::test(start_paused = true)]
async fn replayer_dead_letters_a_client_error_at_once() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/orders").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = Replayer::http(queue.clone(), counting(422, calls.clone()))
        .spawn()
        .unwrap();
    eventually(|| handle.stats().dead_lettered == 1).await;
    handle.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let dead = queue.dead_letters(10).await.unwrap();
    assert!(dead[0].reason.contains("422"), "{}", dead[0].reason);
}

/// An envelope from another producer (or an older version) is replayed without the
/// hop-by-hop, length and stale deadline headers it carries, and with a key the
/// receiver can de-duplicate on (its message id) when its own is blank.
#[tokio::test(start_paused = true)]
async fn a_foreign_envelope_is_replayed_without_hop_by_hop_headers_and_with_a_key() {
    let queue = Arc::new(MemoryQueue::new());
    let mut env = due_envelope("http://api.test/orders");
    env.idempotency_key = " ".into();
    env.headers = [
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("content-length", "999"),
        ("transfer-encoding", "chunked"),
        ("postbox-timeout-ms", "5"),
        ("x-kept", "yes"),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_owned(), Bytes::from_static(v.as_bytes())))
    .collect();
    let id = queue.enqueue(env).await.unwrap().id();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let svc = service_fn(move |req: InnerReq| {
        seen2.lock().unwrap().push(req.headers().clone());
        async move { Ok::<_, BoxError>(respond(200, "")) }
    });
    let handle = Replayer::http(queue.clone(), svc).spawn().unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    handle.shutdown().await;
    let seen = seen.lock().unwrap();
    let names: Vec<&str> = seen[0].keys().map(|n| n.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(seen[0]["x-kept"], "yes");
    assert_eq!(seen[0][IDEMPOTENCY_KEY_HEADER], id.to_string().as_str());
}

/// An envelope for `uri`, due and long expired (at 1 s past the epoch).
fn expired_envelope(uri: String) -> Envelope {
    let mut env = Envelope::new(
        "api.test",
        "POST",
        uri,
        Bytes::new(),
        DeferReason::BulkheadFull,
    );
    env.not_before = SystemTime::UNIX_EPOCH;
    env.expires_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1));
    env
}

#[tokio::test(start_paused = true)]
async fn replayer_dead_letters_expired_messages_without_replaying() {
    let queue = Arc::new(MemoryQueue::new());
    queue
        .enqueue(expired_envelope("http://api.test/x".into()))
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = Replayer::http(queue.clone(), counting(200, calls.clone()))
        .spawn()
        .unwrap();
    eventually(|| handle.stats().dead_lettered == 1).await;
    handle.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// The replayer reports the queue's depth while a backlog keeps its leases coming (a
/// burst of expired messages, dead-lettered without a task each), not only once the
/// backlog is gone: the dead letters' gauge is what shows such a burst.
#[tokio::test(start_paused = true)]
async fn the_depth_is_reported_while_a_backlog_keeps_the_leases_coming() {
    let queue = Arc::new(AckRecorder::default());
    for i in 0..50 {
        queue
            .enqueue(expired_envelope(format!("http://api.test/{i}")))
            .await
            .unwrap();
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = Replayer::http(queue.clone(), counting(200, calls.clone()))
        .lease_batch(1)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().dead_lettered == 50).await;
    handle.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let first = queue.depth_calls().first().copied();
    assert!(
        first.is_some_and(|dead| dead < 50),
        "the first depth came after the whole burst: {first:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn replayer_waits_while_the_breaker_is_open() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    let times = Arc::new(Mutex::new(Vec::new()));
    let times2 = times.clone();
    let svc = service_fn(move |_req: InnerReq| {
        let mut times = times2.lock().unwrap();
        times.push(tokio::time::Instant::now());
        let first = times.len() == 1;
        async move {
            if first {
                Err(boxed(Open::new(Duration::from_secs(30))))
            } else {
                Ok(respond(200, ""))
            }
        }
    });
    let handle = Replayer::http(queue.clone(), svc).spawn().unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    handle.shutdown().await;
    let times = times.lock().unwrap();
    assert_eq!(times.len(), 2);
    assert!(
        times[1] - times[0] >= Duration::from_secs(30),
        "{:?}",
        times[1] - times[0]
    );
}

/// Five rejections by an open breaker, then one real failure, then success: with
/// `max_attempts(3)` the message is delivered, because the rejections never reached the
/// dependency and are not counted.
#[tokio::test(start_paused = true)]
async fn replayer_rejections_by_an_open_breaker_do_not_use_up_attempts() {
    let calls = delivered_despite(3, |n| match n {
        0..5 => Err(boxed(Open::new(Duration::from_secs(1)))),
        5 => Ok(respond(503, "")),
        _ => Ok(respond(200, "")),
    })
    .await;
    assert_eq!(calls, 7);
}

/// Replays one message through a dependency that answers call `n` with `answer(n)`,
/// with `max_attempts`: it is delivered in the end, not dead-lettered. Returns the
/// number of calls.
async fn delivered_despite(
    max_attempts: u32,
    answer: impl Fn(usize) -> Result<Res, BoxError> + Clone + Send + Sync + 'static,
) -> usize {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let svc = service_fn(move |_req: InnerReq| {
        let out = answer(calls2.fetch_add(1, Ordering::SeqCst));
        async move { out }
    });
    let handle = Replayer::http(queue.clone(), svc)
        .max_attempts(max_attempts)
        .jitter(false)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    assert_eq!(handle.stats().dead_lettered, 0);
    handle.shutdown().await;
    calls.load(Ordering::SeqCst)
}

/// The README's client stack in small: a retry (two retries 10 ms apart; a longer hint
/// than 1 s ends them) outside a breaker that opens on one failure for 10 s and lets
/// one probe through.
fn retry_outside_a_breaker<C, R, Req, S>(
    retry: postbox::retry::RetryBuilder<C, R, ()>,
    classifier: C,
    dependency: S,
) -> impl Service<Req, Response = S::Response, Error: Into<BoxError> + Send, Future: Send>
+ Clone
+ Send
+ 'static
where
    C: postbox::classify::Classify<S::Response, postbox::circuit_breaker::error::Error<S::Error>>
        + postbox::classify::Classify<S::Response, S::Error>
        + Clone
        + Send
        + Sync
        + 'static,
    R: postbox::retry::CloneRequest<Req> + Clone + Send + Sync + 'static,
    Req: Send + 'static,
    S: Service<Req, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
{
    use postbox::circuit_breaker::CircuitBreakerLayer;
    use postbox::retry::backoff::Backoff;
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .permitted_probes(1)
        .break_duration(Duration::from_secs(10))
        .build()
        .unwrap()
        .with_classifier(classifier);
    let retry = retry
        .max_retries(2)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .max_retry_after(Duration::from_secs(1))
        .no_budget()
        .build()
        .unwrap();
    ServiceBuilder::new()
        .layer(retry)
        .layer(breaker)
        .service(dependency)
}

/// Waits (in paused time, 5 s steps) up to `limit` for the one message to be
/// dead-lettered.
async fn dead_lettered_within(
    handle: &postbox::enqueue::ReplayerHandle,
    limit: Duration,
    calls: &AtomicUsize,
) {
    let start = tokio::time::Instant::now();
    while handle.stats().dead_lettered == 0 && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert_eq!(
        handle.stats().dead_lettered,
        1,
        "replayed {} times, never counted",
        calls.load(Ordering::SeqCst)
    );
}

/// A message that always fails, replayed through the recommended stack (retry outside
/// a breaker): each replay's first attempt is the half-open probe, which fails and
/// opens the breaker, and the retry then meets the open breaker. That replay reached
/// the dependency, so it counts: the message is dead-lettered after `max_attempts`.
/// (It was put back uncounted every time, as if rejected before any call, and
/// replayed for ever.)
#[tokio::test(start_paused = true)]
async fn a_replay_whose_retry_meets_the_breaker_its_own_failure_opened_still_counts() {
    use postbox::retry::RetryLayer;
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let dependency = service_fn(move |_req: InnerReq| {
        calls2.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(respond(500, "")) }
    });
    let stack = retry_outside_a_breaker(RetryLayer::http(), HttpClassifier::new(), dependency);
    let handle = Replayer::http(queue.clone(), stack)
        .max_attempts(3)
        .jitter(false)
        .spawn()
        .unwrap();
    dead_lettered_within(&handle, Duration::from_secs(500), &calls).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    handle.shutdown().await;
}

/// A replay counted because its attempt reached the dependency before its retry met
/// the open breaker still pauses its destination until the breaker's break ends: a
/// message for it due meanwhile is not called just to be turned away. (Counting it
/// skipped the pause.)
#[tokio::test(start_paused = true)]
async fn a_counted_replay_on_an_open_breaker_still_pauses_the_replayer() {
    use postbox::retry::RetryLayer;
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/poison").await;
    let dependency = service_fn(move |req: InnerReq| {
        let status = if req.uri().path() == "/poison" {
            500
        } else {
            200
        };
        async move { Ok::<_, BoxError>(respond(status, "")) }
    });
    let stack = retry_outside_a_breaker(RetryLayer::http(), HttpClassifier::new(), dependency);
    let handle = Replayer::http(queue.clone(), stack)
        .max_attempts(3)
        .jitter(false)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().retried == 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    enqueue_raw(&queue, "http://api.test/fine").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        handle.stats().retried,
        1,
        "a message was leased during the break, only to be turned away"
    );
    eventually(|| handle.stats().replayed == 1).await;
    handle.shutdown().await;
}

/// The same for a request type of your own (a codec with no log of its own): the
/// retry layer notes the attempt on the replay's task, so a command that always fails
/// is dead-lettered after `max_attempts` too.
#[tokio::test(start_paused = true)]
async fn a_typed_replay_whose_retry_meets_the_breaker_its_own_failure_opened_still_counts() {
    use postbox::retry::RetryLayer;
    let queue = Arc::new(MemoryQueue::new());
    let mut env = Envelope::new(
        "",
        "RUN",
        "/commands",
        Bytes::from_static(b"reindex"),
        DeferReason::RetriesExhausted,
    );
    env.idempotency_key = "cmd-1".into();
    queue.enqueue(env).await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let dependency = service_fn(move |_: Command| {
        calls2.fetch_add(1, Ordering::SeqCst);
        async {
            Err::<u32, BoxError>(boxed(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            )))
        }
    });
    let stack = retry_outside_a_breaker(
        RetryLayer::builder(),
        postbox::classify::ErrorClassifier::new(),
        dependency,
    );
    let handle = Replayer::new(queue.clone(), stack, CommandCodec)
        .max_attempts(3)
        .jitter(false)
        .spawn()
        .unwrap();
    dead_lettered_within(&handle, Duration::from_secs(500), &calls).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    handle.shutdown().await;
}

/// Rejections by our own bulkhead (and deadlines spent before the call) never reached
/// the dependency: with `max_attempts(2)`, ten of them and one real failure still end
/// in a delivery, not a dead letter.
#[tokio::test(start_paused = true)]
async fn replayer_rejections_by_our_own_limits_do_not_use_up_attempts() {
    let calls = delivered_despite(2, |n| match n {
        0..5 => Err(boxed(BulkheadFull::new(4, 0))),
        5..10 => Err(boxed(DeadlineExceeded::new(Duration::ZERO, true))),
        10 => Ok(respond(503, "")),
        _ => Ok(respond(200, "")),
    })
    .await;
    assert_eq!(calls, 12);
}

/// While our own limit turns every replay away (a bulkhead full of live traffic), the
/// replayer pauses the destination, longer while it stays full, instead of calling,
/// rejecting and releasing the whole backlog again and again: its messages are leased
/// and held back once per pause, not once a second; once there is room, everything is
/// delivered.
#[tokio::test(start_paused = true)]
async fn a_full_bulkhead_pauses_leasing_instead_of_churning_the_backlog() {
    let queue = Arc::new(MemoryQueue::new());
    for i in 0..200 {
        enqueue_raw(&queue, &format!("http://api.test/{i}")).await;
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let full = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let svc = {
        let (calls, full) = (calls.clone(), full.clone());
        service_fn(move |_req: InnerReq| {
            calls.fetch_add(1, Ordering::SeqCst);
            let out = if full.load(Ordering::SeqCst) {
                Err(boxed(BulkheadFull::new(4, 0)))
            } else {
                Ok(respond(200, ""))
            };
            async move { out }
        })
    };
    let handle = Replayer::http(queue.clone(), svc)
        .jitter(false)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    // Churning, every message would have been tried about once a second (~6000 calls).
    let turned_away = calls.load(Ordering::SeqCst);
    assert!(
        turned_away < 200,
        "{turned_away} replays turned away in 30 s"
    );
    // Pauses of 1, 2, 4, 8 and 16 s: the backlog held back at most five times over.
    let held_back = handle.stats().held_back;
    assert!(
        held_back <= 5 * 200,
        "{held_back} messages held back in 30 s"
    );
    full.store(false, Ordering::SeqCst);
    eventually(|| handle.stats().replayed == 200).await;
    let stats = handle.shutdown().await;
    assert_eq!(stats.dead_lettered, 0);
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_returns_in_flight_leases() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    enqueue_raw(&queue, "http://api.test/b").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let hung = service_fn(move |_req: InnerReq| {
        calls2.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<Result<Res, BoxError>>()
    });
    let handle = Replayer::http(queue.clone(), hung)
        .grace(Duration::from_secs(1))
        .spawn()
        .unwrap();
    eventually(|| calls.load(Ordering::SeqCst) == 2).await;
    assert_eq!(depth(&queue).await.in_flight, 2);
    let stats = handle.shutdown().await;
    assert_eq!(stats.returned, 2);
    assert_eq!(
        depth(&queue).await,
        Depth {
            pending: 2,
            in_flight: 0,
            dead: 0
        }
    );
}

/// A shutdown with the queue unavailable (a broker dropping packets, each call waiting
/// out its timeout) ends soon after its grace: once one lease cannot be returned, the
/// rest are left to their leases' end (they come back then). It took a timeout per
/// lease in flight, and one more for the depth.
#[tokio::test(start_paused = true)]
async fn a_shutdown_with_the_queue_down_ends_soon_after_its_grace() {
    let queue = AckRecorder::default();
    for i in 0..4 {
        enqueue_raw(&queue.inner, &format!("http://api.test/{i}")).await;
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let hung = service_fn({
        let calls = calls.clone();
        move |_req: InnerReq| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<Res, BoxError>>()
        }
    });
    let handle = Replayer::http(Arc::new(queue.clone()), hung)
        .grace(Duration::from_secs(1))
        .spawn()
        .unwrap();
    eventually(|| calls.load(Ordering::SeqCst) == 4).await;
    queue.fail_next_settles_after(usize::MAX, Duration::from_secs(5));
    let start = tokio::time::Instant::now();
    let stats = handle.shutdown().await;
    assert!(
        start.elapsed() <= Duration::from_secs(7),
        "the shutdown took {:?}",
        start.elapsed()
    );
    assert_eq!(stats.returned, 0);
    assert_eq!(depth(&queue.inner).await.in_flight, 4, "a lease was lost");
}

/// A message whose turn in its batch comes after the batch's cut-off (the queue calls
/// for the messages before it stalled) is given back uncounted, not started: its
/// replay would be cut off at its first poll, after the request may have gone out,
/// and counted as a failed attempt.
#[tokio::test(start_paused = true)]
async fn a_batch_member_reached_after_the_cut_off_is_given_back_not_started() {
    let queue = AckRecorder::default();
    let mut expired = due_envelope("http://api.test/expired");
    expired.expires_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1));
    queue.inner.enqueue(expired).await.unwrap();
    let due = enqueue_raw(&queue.inner, "http://api.test/due").await;
    // The expired message's dead letter stalls past the cut-off, then fails.
    queue.fail_next_settles_after(1, Duration::from_secs(28));
    let cut = Arc::new(AtomicUsize::new(0));
    let svc = service_fn({
        let cut = cut.clone();
        move |_req: InnerReq| {
            struct Cut(Option<Arc<AtomicUsize>>);
            impl Drop for Cut {
                fn drop(&mut self) {
                    if let Some(cut) = self.0.take() {
                        cut.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            let mut guard = Cut(Some(cut.clone()));
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                guard.0.take();
                Ok::<_, BoxError>(respond(200, ""))
            }
        }
    });
    let handle = Replayer::http(Arc::new(queue.clone()), svc)
        .lease_for(Duration::from_secs(30))
        .lease_batch(2)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    let stats = handle.shutdown().await;
    assert_eq!(
        cut.load(Ordering::SeqCst),
        0,
        "a replay was started past its cut-off"
    );
    assert_eq!(stats.retried, 0);
    assert!(queue.inner.get(due).is_none(), "{due} not replayed");
}

/// A replay cut short by a shutdown does not use up an attempt: a message on its last
/// attempt is replayed by the next replayer, not dead-lettered unjudged at its lease.
#[tokio::test(start_paused = true)]
async fn a_replay_cut_short_by_shutdown_on_its_last_attempt_is_not_dead_lettered() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    let started = Arc::new(AtomicUsize::new(0));
    let started2 = started.clone();
    let hung = service_fn(move |_req: InnerReq| {
        started2.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<Result<Res, BoxError>>()
    });
    let handle = Replayer::http(queue.clone(), hung)
        .max_attempts(1)
        .grace(Duration::from_secs(1))
        .spawn()
        .unwrap();
    eventually(|| started.load(Ordering::SeqCst) == 1).await;
    assert_eq!(handle.shutdown().await.returned, 1);

    let calls = Arc::new(AtomicUsize::new(0));
    let handle = Replayer::http(queue.clone(), counting(200, calls.clone()))
        .max_attempts(1)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed + handle.stats().dead_lettered == 1).await;
    let stats = handle.shutdown().await;
    assert_eq!((stats.replayed, stats.dead_lettered), (1, 0));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A replay still running near the end of its lease is cut off and retried later:
/// the lease never runs out under it, so the message is never replayed twice at once.
#[tokio::test(start_paused = true)]
async fn a_replay_running_past_its_lease_is_cut_off_not_run_twice_at_once() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (running2, most2, calls2) = (running.clone(), most.clone(), calls.clone());
    let svc = service_fn(move |_req: InnerReq| {
        let (running, most) = (running2.clone(), most2.clone());
        let first = calls2.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            struct Running(Arc<AtomicUsize>);
            impl Drop for Running {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            let _running = Running(running);
            most.fetch_max(now, Ordering::SeqCst);
            if first {
                std::future::pending::<()>().await; // hangs until cut off
            }
            Ok::<_, BoxError>(respond(200, ""))
        }
    });
    let handle = Replayer::http(queue.clone(), svc)
        .lease_for(Duration::from_secs(10))
        .jitter(false)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    let stats = handle.shutdown().await;
    assert_eq!(most.load(Ordering::SeqCst), 1, "replayed twice at once");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!((stats.retried, stats.dead_lettered), (1, 0));
    assert_eq!(depth(&queue).await, Depth::default());
}

/// A replay still waiting for the service to be ready when its lease nears its end
/// never reached the dependency: cut off, it goes back uncounted, so a message is not
/// dead-lettered by a service that stayed busy.
#[tokio::test(start_paused = true)]
async fn a_replay_never_ready_before_its_lease_ends_is_not_counted() {
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    // No waker when pending: the replayer's cut-off timer wakes the task.
    let busy = Readiness(move || {
        if tokio::time::Instant::now() < until {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(Ok(()))
        }
    });
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    let handle = Replayer::http(queue.clone(), busy)
        .lease_for(Duration::from_secs(10))
        .max_attempts(1)
        .jitter(false)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed + handle.stats().dead_lettered == 1).await;
    let stats = handle.shutdown().await;
    assert_eq!((stats.replayed, stats.dead_lettered), (1, 0));
}

/// Dropping the handle stops the worker as `shutdown` does: a replay that finishes
/// within the grace period is acked, one that does not is returned to the queue.
#[tokio::test(start_paused = true)]
async fn dropping_the_handle_finishes_quick_replays_and_returns_the_rest() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/quick").await;
    enqueue_raw(&queue, "http://api.test/hung").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let svc = service_fn(move |req: InnerReq| {
        calls2.fetch_add(1, Ordering::SeqCst);
        async move {
            let wait = if req.uri().path() == "/quick" {
                1
            } else {
                3600
            };
            tokio::time::sleep(Duration::from_secs(wait)).await;
            Ok::<_, BoxError>(respond(200, ""))
        }
    });
    let handle = Replayer::http(queue.clone(), svc)
        .grace(Duration::from_secs(5))
        .spawn()
        .unwrap();
    eventually(|| calls.load(Ordering::SeqCst) == 2).await;
    drop(handle);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        depth(&queue).await,
        Depth {
            pending: 1,
            in_flight: 0,
            dead: 0
        },
        "the quick replay was acked, the hung one returned"
    );
    // Whatever not-before it was returned with, it is due within the hour.
    let later = SystemTime::now() + Duration::from_secs(3600);
    let left = queue
        .lease(10, Duration::from_secs(60), later)
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].envelope.uri, "http://api.test/hung");
}

#[tokio::test(start_paused = true)]
async fn replayer_respects_its_concurrency_limit() {
    let queue = Arc::new(MemoryQueue::new());
    for i in 0..10 {
        enqueue_raw(&queue, &format!("http://api.test/{i}")).await;
    }
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let svc = service_fn(move |_req: InnerReq| {
        let (r, p) = (r.clone(), p.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, BoxError>(respond(200, ""))
        }
    });
    let handle = Replayer::http(queue.clone(), svc)
        .concurrency(3)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 10).await;
    handle.shutdown().await;
    assert_eq!(peak.load(Ordering::SeqCst), 3);
}

/// When (paused time) and for which path the replayer called the dependency.
type Calls = Arc<Mutex<Vec<(String, tokio::time::Instant)>>>;

/// A dependency that records every call and answers call `n` (0-based, over all
/// messages) with `answer(n, path)`.
fn scripted<F>(
    calls: Calls,
    answer: F,
) -> impl Service<InnerReq, Response = Res, Error = BoxError, Future: Send> + Clone + Send + 'static
where
    F: Fn(usize, &str) -> Result<Res, BoxError> + Clone + Send + Sync + 'static,
{
    service_fn(move |req: InnerReq| {
        let path = req.uri().path().to_owned();
        let out = {
            let mut calls = calls.lock().unwrap();
            calls.push((path.clone(), tokio::time::Instant::now()));
            answer(calls.len() - 1, &path)
        };
        async move { out }
    })
}

/// A `503` carrying `Retry-After: {secs}`.
fn unavailable_for(secs: u64) -> Res {
    let mut res = respond(503, "");
    res.headers_mut()
        .insert(http::header::RETRY_AFTER, secs.to_string().parse().unwrap());
    res
}

/// The gaps between consecutive calls.
fn gaps(calls: &Calls) -> Vec<Duration> {
    let calls = calls.lock().unwrap();
    calls.windows(2).map(|w| w[1].1 - w[0].1).collect()
}

/// `gap` is at least `want` and less than one poll interval more (the replayer notices a
/// due message at its next poll).
#[track_caller]
fn assert_gap(gap: Duration, want: Duration, poll: Duration) {
    assert!(
        gap >= want && gap < want + poll,
        "gap {gap:?}, want {want:?} (+ less than {poll:?})"
    );
}

#[tokio::test(start_paused = true)]
async fn replayer_backs_off_exponentially_between_retries_of_a_retryable_failure() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    let calls = Calls::default();
    // Three plain 503s (retryable, no hint), then success.
    let svc = scripted(calls.clone(), |n, _| {
        Ok(respond(if n < 3 { 503 } else { 200 }, ""))
    });
    let poll = Duration::from_millis(100);
    let handle = Replayer::http(queue.clone(), svc)
        .jitter(false)
        .backoff(Duration::from_secs(1), Duration::from_secs(60))
        .poll_interval(poll)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    let stats = handle.shutdown().await;
    assert_eq!(stats.retried, 3);
    let gaps = gaps(&calls);
    assert_eq!(gaps.len(), 3, "{gaps:?}");
    // base * 2^(attempts-1): 1 s, 2 s, 4 s — never earlier.
    for (gap, want) in gaps.iter().zip([1, 2, 4]) {
        assert_gap(*gap, Duration::from_secs(want), poll);
    }
}

#[tokio::test(start_paused = true)]
async fn replayer_waits_for_a_retry_after_hint_longer_than_its_backoff() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    let calls = Calls::default();
    // A plain 503 (backoff 1 s), then a 503 with `Retry-After: 10` where the backoff
    // would be 2 s, then success.
    let svc = scripted(calls.clone(), |n, _| match n {
        0 => Ok(respond(503, "")),
        1 => Ok(unavailable_for(10)),
        _ => Ok(respond(200, "")),
    });
    let poll = Duration::from_millis(100);
    let handle = Replayer::http(queue.clone(), svc)
        .jitter(false)
        .backoff(Duration::from_secs(1), Duration::from_secs(60))
        .poll_interval(poll)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    handle.shutdown().await;
    let gaps = gaps(&calls);
    assert_eq!(gaps.len(), 2, "{gaps:?}");
    assert_gap(gaps[0], Duration::from_secs(1), poll);
    assert_gap(gaps[1], Duration::from_secs(10), poll);
}

/// A dependency's `Retry-After` is honoured only up to `max_retry_after`: ten days
/// become 30 s (and the default cap is an hour), so a bogus hint does not park the
/// message.
#[tokio::test(start_paused = true)]
async fn replayer_clamps_a_retry_after_hint_to_max_retry_after() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    let calls = Calls::default();
    let svc = scripted(calls.clone(), |n, _| match n {
        0 => Ok(unavailable_for(10 * 24 * 3600)),
        _ => Ok(respond(200, "")),
    });
    let poll = Duration::from_millis(100);
    let handle = Replayer::http(queue.clone(), svc)
        .jitter(false)
        .backoff(Duration::from_secs(1), Duration::from_secs(60))
        .max_retry_after(Duration::from_secs(30))
        .poll_interval(poll)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    handle.shutdown().await;
    let gaps = gaps(&calls);
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_gap(gaps[0], Duration::from_secs(30), poll);
    assert_eq!(
        postbox::enqueue::DEFAULT_MAX_RETRY_AFTER,
        Duration::from_secs(3600)
    );
}

/// A replay answered with a Retry-After that reaches past the message's expiry is
/// dead-lettered at once: it could never be tried again, and waiting would only hold it
/// (and its key) until it expired.
#[tokio::test(start_paused = true)]
async fn replayer_dead_letters_at_once_a_retry_that_would_pass_the_expiry() {
    let queue = Arc::new(MemoryQueue::new());
    let mut env = due_envelope("http://api.test/a");
    // (The replayer's wall clock may drift from `SystemTime::now()` by the time other
    // paused-time tests advanced: a wide margin.)
    // The hint, clamped to the default cap of an hour, still passes the expiry.
    env.expires_at = Some(SystemTime::now() + Duration::from_secs(1800));
    queue.enqueue(env).await.unwrap();
    let calls = Calls::default();
    let svc = scripted(calls.clone(), |_, _| Ok(unavailable_for(60 * 24 * 3600)));
    let handle = Replayer::http(queue.clone(), svc).spawn().unwrap();
    eventually(|| handle.stats().dead_lettered == 1).await;
    assert_eq!(handle.stats().retried, 0);
    handle.shutdown().await;
    assert_eq!(calls.lock().unwrap().len(), 1);
    let dead = queue.dead_letters(10).await.unwrap();
    assert!(
        dead[0].reason.contains("expires before its next try"),
        "{}",
        dead[0].reason
    );
}

/// With a zero backoff base, a breaker answering "open, retry now" (a busy half-open
/// breaker) still pauses the replayer for a poll interval between tries: no hot loop.
#[tokio::test(start_paused = true)]
async fn replayer_pauses_a_poll_interval_for_an_open_breaker_even_with_zero_backoff() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    let calls = Calls::default();
    let svc = scripted(calls.clone(), |n, _| {
        if n < 3 {
            Err(boxed(Open::new(Duration::ZERO)))
        } else {
            Ok(respond(200, ""))
        }
    });
    let poll = Duration::from_millis(100);
    let handle = Replayer::http(queue.clone(), svc)
        .jitter(false)
        .backoff(Duration::ZERO, Duration::from_secs(60))
        .poll_interval(poll)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    handle.shutdown().await;
    for gap in gaps(&calls) {
        assert!(gap >= poll, "gap {gap:?}");
    }
}

/// With a zero backoff base, a delivery answered with a retryable failure goes back to
/// the queue for at least a poll interval: its attempts are not burnt in a hot loop
/// (during an outage every message was dead-lettered within milliseconds).
#[tokio::test(start_paused = true)]
async fn replayer_retries_a_failed_delivery_no_sooner_than_a_poll_interval_with_zero_backoff() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    let calls = Calls::default();
    let svc = scripted(calls.clone(), |n, _| {
        Ok(if n < 3 {
            respond(503, "")
        } else {
            respond(200, "")
        })
    });
    let poll = Duration::from_millis(100);
    let handle = Replayer::http(queue.clone(), svc)
        .jitter(false)
        .max_attempts(5)
        .backoff(Duration::ZERO, Duration::from_secs(60))
        .poll_interval(poll)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    assert_eq!(handle.stats().dead_lettered, 0);
    handle.shutdown().await;
    assert_eq!(calls.lock().unwrap().len(), 4);
    for gap in gaps(&calls) {
        assert!(gap >= poll, "gap {gap:?}");
    }
}

/// An ack batch holding a stale token (its lease lapsed while the ack waited) acks the
/// others, and the queue answers `LeaseLost` naming the stale one: the others are still
/// counted as replayed. None were, and a caller waiting for the count waited for ever.
#[tokio::test(start_paused = true)]
async fn acks_of_a_batch_with_a_stale_token_are_counted() {
    let queue = Arc::new(AckRecorder::default());
    queue.make_the_last_token_of_acks_stale();
    for i in 0..3 {
        enqueue_raw(&queue.inner, &format!("http://api.test/{i}")).await;
    }
    let calls = Calls::default();
    let svc = scripted(calls.clone(), |_, _| Ok(respond(200, "")));
    let handle = Replayer::http(queue.clone(), svc)
        .concurrency(1)
        .ack_batch(3, Duration::from_secs(5))
        .spawn()
        .unwrap();
    eventually(|| !queue.acks().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The stale one is counted when its message is replayed again (here it was acked).
    assert_eq!(handle.stats().replayed, 2);
    handle.shutdown().await;
    let sizes: Vec<usize> = queue.acks().iter().map(|(n, _)| *n).collect();
    assert_eq!(sizes, [3]);
    assert_eq!(depth(&queue.inner).await, Depth::default());
    assert_eq!(calls.lock().unwrap().len(), 3);
}

/// A replay answered with a `Retry-After` too large for the clock (and no cap) goes back
/// to the queue far in the future; the replayer neither panics nor stops, and replays the next
/// message.
#[tokio::test(start_paused = true)]
async fn replayer_survives_an_overflowing_retry_after() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    let calls = Calls::default();
    let svc = scripted(calls.clone(), |n, _| {
        Ok(if n == 0 {
            unavailable_for(u64::MAX)
        } else {
            respond(200, "")
        })
    });
    let handle = Replayer::http(queue.clone(), svc)
        .concurrency(1)
        .max_retry_after(Duration::MAX)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().retried == 1).await;
    enqueue_raw(&queue, "http://api.test/b").await;
    eventually(|| handle.stats().replayed == 1).await;
    handle.shutdown().await;
    assert_eq!(depth(&queue).await.pending, 1, "the first waits, far ahead");
}

/// Seven messages replayed one at a time with `ack_batch(3, ..)`: acks go out as 3, 3,
/// and the last one as soon as the replayer is idle, not after the interval.
#[tokio::test(start_paused = true)]
async fn replayer_acks_in_batches_and_flushes_the_rest_when_idle() {
    let queue = Arc::new(AckRecorder::default());
    for i in 0..7 {
        enqueue_raw(&queue.inner, &format!("http://api.test/{i}")).await;
    }
    let calls = Calls::default();
    let svc = scripted(calls.clone(), |_, _| Ok(respond(200, "")));
    let start = tokio::time::Instant::now();
    let handle = Replayer::http(queue.clone(), svc)
        .concurrency(1)
        .ack_batch(3, Duration::from_secs(5))
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 7).await;
    handle.shutdown().await;
    let acks = queue.acks();
    let sizes: Vec<usize> = acks.iter().map(|(n, _)| *n).collect();
    assert_eq!(sizes, [3, 3, 1]);
    // Nothing waited for the 5 s interval: the idle flush was immediate.
    let (_, last) = acks[2];
    assert!(last - start < Duration::from_secs(1), "{:?}", last - start);
    assert_eq!(depth(&queue.inner).await, Depth::default());
}

/// A queue holding one due message, whose next `n` settling calls fail as unavailable,
/// and a call counter for the service.
async fn one_message_failing_settles(n: usize) -> (Arc<AckRecorder>, Arc<AtomicUsize>) {
    let queue = Arc::new(AckRecorder::default());
    enqueue_raw(&queue.inner, "http://api.test/orders").await;
    queue.fail_next_settles(n);
    (queue, Arc::new(AtomicUsize::new(0)))
}

/// The queue is down while two acks wait: the older one's lease runs out first. The
/// newer ack is still sent again every poll interval (the older one is dropped), so once
/// the queue is back the newer message is acked, not replayed a second time.
#[tokio::test(start_paused = true)]
async fn replayer_keeps_resending_a_newer_ack_after_an_older_one_expired() {
    let queue = Arc::new(AckRecorder::default());
    enqueue_raw(&queue.inner, "http://api.test/a").await;
    queue.fail_next_settles(usize::MAX);
    let calls = Calls::default();
    let seen = calls.clone();
    // `a` replayed again (its lease ran out) answers only after the queue is back, so
    // no failure of its own re-arms the resending.
    let svc = service_fn(move |req: InnerReq| {
        let path = req.uri().path().to_owned();
        let again = {
            let mut calls = seen.lock().unwrap();
            let again = calls.iter().any(|(p, _)| *p == path);
            calls.push((path, tokio::time::Instant::now()));
            again
        };
        async move {
            if again {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok::<_, BoxError>(respond(200, ""))
        }
    });
    let start = tokio::time::Instant::now();
    let handle = Replayer::http(queue.clone(), svc)
        .lease_for(Duration::from_secs(10))
        .poll_interval(Duration::from_secs(1))
        .ack_batch(1, Duration::from_millis(10))
        .spawn()
        .unwrap();
    tokio::time::sleep_until(start + Duration::from_secs(7)).await;
    enqueue_raw(&queue.inner, "http://api.test/b").await;
    tokio::time::sleep_until(start + Duration::from_millis(10_500)).await;
    queue.fail_next_settles(0);
    tokio::time::sleep_until(start + Duration::from_secs(40)).await;
    handle.shutdown().await;
    let b = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(path, _)| path == "/b")
        .count();
    assert_eq!(b, 1, "b was replayed again: its ack was not resent");
}

/// A message the queue gives back while its replay still runs (RabbitMQ requeues the
/// deliveries of a connection that dropped) is not replayed a second time beside it:
/// it is held back, uncounted, and replayed again only after the first replay ended.
/// (Both ran at once, each counted as an attempt.)
#[tokio::test(start_paused = true)]
async fn a_message_given_back_while_its_replay_runs_is_not_replayed_beside_it() {
    let queue = Arc::new(AckRecorder::default());
    enqueue_raw(&queue.inner, "http://api.test/orders").await;
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (r, m, c) = (running.clone(), most.clone(), calls.clone());
    let svc = service_fn(move |_: InnerReq| {
        let (r, m) = (r.clone(), m.clone());
        c.fetch_add(1, Ordering::SeqCst);
        let now = r.fetch_add(1, Ordering::SeqCst) + 1;
        m.fetch_max(now, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            r.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, BoxError>(respond(200, ""))
        }
    });
    let handle = Replayer::http(queue.clone(), svc)
        .lease_for(Duration::from_secs(30))
        .poll_interval(Duration::from_secs(1))
        .spawn()
        .unwrap();
    eventually(|| calls.load(Ordering::SeqCst) == 1).await;
    queue.give_back_leases().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(most.load(Ordering::SeqCst), 1, "replayed twice at once");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The first replay's ack finds its lease gone; the message held back comes back
    // once that lease is over, and is replayed then, alone.
    tokio::time::sleep(Duration::from_secs(60)).await;
    handle.shutdown().await;
    assert_eq!(most.load(Ordering::SeqCst), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// An ack the queue could not take just before a shutdown is sent again during the
/// grace period, while its lease still holds, not only once the grace is over (when
/// another replayer may have leased the message again).
#[tokio::test(start_paused = true)]
async fn an_ack_the_queue_could_not_take_is_sent_again_during_the_shutdown_grace() {
    let queue = Arc::new(AckRecorder::default());
    enqueue_raw(&queue.inner, "http://api.test/a").await;
    enqueue_raw(&queue.inner, "http://api.test/b").await;
    let svc = service_fn(|req: InnerReq| {
        let slow = req.uri().path() == "/b";
        async move {
            if slow {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok::<_, BoxError>(respond(200, ""))
        }
    });
    queue.fail_next_settles(1);
    let handle = Replayer::http(queue.clone(), svc)
        .lease_for(Duration::from_secs(120))
        .poll_interval(Duration::from_secs(1))
        .ack_batch(1, Duration::from_millis(10))
        .grace(Duration::from_secs(20))
        .spawn()
        .unwrap();
    eventually(|| !queue.acks().is_empty()).await;
    let start = tokio::time::Instant::now();
    handle.shutdown().await;
    let acks = queue.acks();
    assert!(acks.len() >= 2, "{acks:?}");
    assert!(
        acks[1].1 < start + Duration::from_secs(5),
        "sent again only at {:?} after the shutdown began",
        acks[1].1 - start
    );
}

/// The grace period waits for settling calls the queue could not take as it waits for
/// replays: with the last replay ended and its ack refused, the ack is tried again
/// until the queue takes it, not once and then left to the lease's end (when the
/// delivered message is replayed again).
#[tokio::test(start_paused = true)]
async fn the_shutdown_grace_waits_for_an_ack_the_queue_refused_after_the_last_replay() {
    let queue = Arc::new(AckRecorder::default());
    enqueue_raw(&queue.inner, "http://api.test/a").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = service_fn({
        let calls = calls.clone();
        move |_: InnerReq| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, BoxError>(respond(200, ""))
            }
        }
    });
    let handle = Replayer::http(queue.clone(), svc)
        .lease_for(Duration::from_secs(120))
        .poll_interval(Duration::from_secs(1))
        .ack_batch(1, Duration::from_millis(10))
        .grace(Duration::from_secs(20))
        .spawn()
        .unwrap();
    eventually(|| calls.load(Ordering::SeqCst) == 1).await;
    queue.fail_next_settles(2);
    let start = tokio::time::Instant::now();
    handle.shutdown().await;
    let acks = queue.acks();
    assert_eq!(
        acks.len(),
        3,
        "two refused tries and the one taken: {acks:?}"
    );
    assert!(
        acks[2].1 < start + Duration::from_secs(10),
        "taken only at {:?} after the shutdown began",
        acks[2].1 - start
    );
    assert_eq!(depth(&queue.inner).await, Depth::default());
}

/// An ack that finds the queue unavailable is sent again once it is back, before the
/// lease expires: the delivered message is not replayed a second time.
#[tokio::test(start_paused = true)]
async fn replayer_sends_an_ack_again_after_the_queue_was_unavailable() {
    let (queue, calls) = one_message_failing_settles(2).await;
    let handle = Replayer::http(queue.clone(), counting(200, calls.clone()))
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    // Well past the lease (60 s): nothing comes back to be replayed again.
    tokio::time::sleep(Duration::from_secs(120)).await;
    handle.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        queue.acks().len(),
        3,
        "two failed tries and the one that worked"
    );
    assert_eq!(depth(&queue.inner).await, Depth::default());
}

/// With a poll interval as long as the lease, a failed ack is still tried again in
/// time (after a twentieth of the lease): it was dropped before its first retry, and the
/// delivered message was replayed a second time.
#[tokio::test(start_paused = true)]
async fn a_failed_ack_is_tried_again_in_time_with_a_poll_interval_as_long_as_the_lease() {
    let (queue, calls) = one_message_failing_settles(1).await;
    let handle = Replayer::http(queue.clone(), counting(200, calls.clone()))
        .lease_for(Duration::from_secs(60))
        .poll_interval(Duration::from_secs(60))
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    tokio::time::sleep(Duration::from_secs(300)).await;
    handle.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "replayed again");
    assert_eq!(depth(&queue.inner).await, Depth::default());
}

/// A dead letter or a retry that finds the queue unavailable is sent again once it is
/// back: the message is not replayed again when its lease expires.
#[tokio::test(start_paused = true)]
async fn replayer_sends_a_dead_letter_and_a_retry_again_after_the_queue_was_unavailable() {
    let (queue, calls) = one_message_failing_settles(1).await;
    let handle = Replayer::http(queue.clone(), counting(422, calls.clone()))
        .spawn()
        .unwrap();
    eventually(|| handle.stats().dead_lettered == 1).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    handle.shutdown().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(depth(&queue.inner).await.dead, 1);

    let (queue, calls) = one_message_failing_settles(1).await;
    let handle = Replayer::http(queue.clone(), counting(503, calls.clone()))
        .max_attempts(2)
        .jitter(false)
        .spawn()
        .unwrap();
    eventually(|| handle.stats().dead_lettered == 1).await;
    let stats = handle.shutdown().await;
    // The retry went through on its second try (not by its lease expiring).
    assert_eq!(stats.retried, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// However many replays finish together, no single `ack` carries more than `ack_batch`
/// tokens (a backend may limit its batch size).
#[tokio::test(start_paused = true)]
async fn replayer_never_acks_more_than_ack_batch_at_once() {
    let queue = Arc::new(AckRecorder::default());
    for i in 0..7 {
        enqueue_raw(&queue.inner, &format!("http://api.test/{i}")).await;
    }
    let calls = Calls::default();
    let svc = scripted(calls.clone(), |_, _| Ok(respond(200, "")));
    let handle = Replayer::http(queue.clone(), svc)
        .concurrency(16)
        .ack_batch(3, Duration::from_secs(5))
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 7).await;
    handle.shutdown().await;
    let sizes: Vec<usize> = queue.acks().iter().map(|(n, _)| *n).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 7, "{sizes:?}");
    assert!(sizes.iter().all(|&n| n <= 3), "{sizes:?}");
    assert_eq!(depth(&queue.inner).await, Depth::default());
}

/// A delivered message is acked once `ack_interval` passes even while another replay is
/// still running (the replayer is not idle and the batch is not full).
#[tokio::test(start_paused = true)]
async fn replayer_flushes_a_partial_ack_batch_when_the_interval_passes() {
    let queue = Arc::new(AckRecorder::default());
    enqueue_raw(&queue.inner, "http://api.test/fast").await;
    enqueue_raw(&queue.inner, "http://api.test/slow").await;
    let svc = service_fn(|req: InnerReq| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        Ok::<_, BoxError>(respond(200, ""))
    });
    let start = tokio::time::Instant::now();
    let handle = Replayer::http(queue.clone(), svc)
        .ack_batch(10, Duration::from_millis(500))
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 2).await;
    handle.shutdown().await;
    let acks: Vec<(usize, Duration)> = queue
        .acks()
        .into_iter()
        .map(|(n, at)| (n, at - start))
        .collect();
    assert_eq!(acks.len(), 2, "{acks:?}");
    // The fast one after the 500 ms interval, while the slow one still runs...
    assert_eq!(acks[0].0, 1);
    assert!(
        acks[0].1 >= Duration::from_millis(500) && acks[0].1 < Duration::from_secs(1),
        "{acks:?}"
    );
    // ...and the slow one when it finishes and the replayer goes idle.
    assert_eq!(acks[1].0, 1);
    assert!(
        acks[1].1 >= Duration::from_secs(3) && acks[1].1 < Duration::from_millis(3500),
        "{acks:?}"
    );
}

/// At shutdown a delivered message is acked at once, not when the grace period ends:
/// a replay still running could hold its ack past its lease, and it would be leased and
/// delivered again. Replays that end during the grace period are acked as they end, not
/// when the last one does.
#[tokio::test(start_paused = true)]
async fn shutdown_acks_delivered_messages_at_once_not_after_the_grace_period() {
    let queue = Arc::new(AckRecorder::default());
    for path in ["fast", "mid", "slow"] {
        enqueue_raw(&queue.inner, &format!("http://api.test/{path}")).await;
    }
    let done = Arc::new(AtomicUsize::new(0));
    let done2 = done.clone();
    let svc = service_fn(move |req: InnerReq| {
        let done = done2.clone();
        async move {
            let wait = match req.uri().path() {
                "/slow" => 10,
                "/mid" => 5,
                _ => 1,
            };
            tokio::time::sleep(Duration::from_secs(wait)).await;
            done.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>(respond(200, ""))
        }
    });
    let start = tokio::time::Instant::now();
    let handle = Replayer::http(queue.clone(), svc)
        .ack_batch(10, Duration::from_secs(5))
        .grace(Duration::from_secs(20))
        .spawn()
        .unwrap();
    eventually(|| done.load(Ordering::SeqCst) == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        queue.acks().is_empty(),
        "the fast one's ack waits for its batch"
    );
    let stopped_at = tokio::time::Instant::now() - start;
    handle.shutdown().await;
    let acks: Vec<(usize, Duration)> = queue
        .acks()
        .into_iter()
        .map(|(n, at)| (n, at - start))
        .collect();
    assert_eq!(acks.len(), 3, "{acks:?}");
    assert_eq!(acks[0], (1, stopped_at), "the fast one at the shutdown");
    for (ack, ends) in acks[1..].iter().zip([5, 10]) {
        let ends = Duration::from_secs(ends);
        assert_eq!(ack.0, 1, "{acks:?}");
        assert!(
            ack.1 >= ends && ack.1 < ends + Duration::from_millis(100),
            "acked as it ends: {acks:?}"
        );
    }
}

/// Two due messages for one destination, replayed one at a time: the first replay finds
/// the breaker open, so the replayer calls nothing for it — not even the other, untried
/// message — until the breaker's `retry_after` has passed.
#[tokio::test(start_paused = true)]
async fn replayer_calls_nothing_for_a_destination_while_its_breaker_is_open() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/a").await;
    enqueue_raw(&queue, "http://api.test/b").await;
    let calls = Calls::default();
    let svc = scripted(calls.clone(), |n, _| {
        if n == 0 {
            Err(boxed(Open::new(Duration::from_secs(30))))
        } else {
            Ok(respond(200, ""))
        }
    });
    let start = tokio::time::Instant::now();
    let handle = Replayer::http(queue.clone(), svc)
        .concurrency(1)
        .poll_interval(Duration::from_millis(100))
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 2).await;
    handle.shutdown().await;
    let calls: Vec<(String, Duration)> = calls
        .lock()
        .unwrap()
        .iter()
        .map(|(p, at)| (p.clone(), *at - start))
        .collect();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[0].0, "/a");
    assert!(calls[0].1 < Duration::from_secs(1), "{calls:?}");
    // Nothing at all, "/b" included, before the breaker's 30 s were up.
    for (path, at) in &calls[1..] {
        assert!(
            *at >= Duration::from_secs(30),
            "{path} at {at:?}: {calls:?}"
        );
    }
    let mut paths: Vec<&str> = calls[1..].iter().map(|(p, _)| p.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(paths, ["/a", "/b"]);
}

/// 40 messages to `stuck.test`, whose replays fail with `error()`, and one behind them
/// to `up.test`: the stats once the healthy one is replayed (checked to be within 5 s,
/// not after the stuck destination's pause) and the calls to the stuck destination.
async fn a_stuck_destination_before_a_healthy_one(error: fn() -> BoxError) -> (ReplayStats, usize) {
    let queue = Arc::new(MemoryQueue::new());
    for i in 0..40 {
        queue
            .enqueue(due_to("stuck.test", &format!("d{i}")))
            .await
            .unwrap();
    }
    queue.enqueue(due_to("up.test", "u")).await.unwrap();
    let calls = Calls::default();
    let svc = scripted(calls.clone(), move |_, path| {
        if path.starts_with("/d") {
            Err(error())
        } else {
            Ok(respond(200, ""))
        }
    });
    let start = tokio::time::Instant::now();
    let handle = Replayer::http(queue.clone(), svc)
        .concurrency(4)
        .lease_batch(4)
        .jitter(false)
        .poll_interval(Duration::from_millis(100))
        .spawn()
        .unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the healthy destination waited {:?}",
        start.elapsed()
    );
    let stats = handle.shutdown().await;
    let stuck = calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p.starts_with("/d"))
        .count();
    (stats, stuck)
}

/// A breaker open for one destination (a per-host breaker, as the standard stack has)
/// holds back only that destination's messages: a healthy destination's message behind
/// a backlog of the broken one's is replayed at once, not after the break.
#[tokio::test(start_paused = true)]
async fn an_open_breaker_for_one_destination_does_not_stall_the_others() {
    let (stats, stuck) =
        a_stuck_destination_before_a_healthy_one(|| boxed(Open::new(Duration::from_secs(30))))
            .await;
    // The first batch of the broken destination met its breaker; the rest were held
    // back uncalled.
    assert!(stuck <= 4, "{stuck} calls to the open destination");
    assert!(stats.held_back >= 36, "{stats:?}");
}

/// Our own full limit for one destination (the config stack's bulkhead is per host)
/// holds back that destination's messages, not the others': leasing paused for
/// everyone, and the same rejected batch, due first again after each pause, kept the
/// healthy destination waiting as long as the busy one stayed full.
#[tokio::test(start_paused = true)]
async fn a_full_bulkhead_for_one_destination_does_not_stall_the_others() {
    let (stats, _) =
        a_stuck_destination_before_a_healthy_one(|| boxed(BulkheadFull::new(100, 0))).await;
    assert!(stats.held_back >= 30, "{stats:?}");
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
}

/// A destination our own limit keeps turning away is paused longer and longer even
/// while another destination's replays go on failing and coming back: its streak is
/// its own. (One streak for the worker, reset by any other verdict, kept the busy
/// destination's pause at its first step: its backlog was leased and held back again
/// every second.)
#[tokio::test(start_paused = true)]
async fn a_full_destinations_pause_grows_while_others_are_replayed() {
    let queue = Arc::new(MemoryQueue::new());
    for i in 0..40 {
        queue
            .enqueue(due_to("busy.test", &format!("d{i}")))
            .await
            .unwrap();
        queue
            .enqueue(due_to("flaky.test", &format!("f{i}")))
            .await
            .unwrap();
    }
    let calls = Calls::default();
    let svc = scripted(calls.clone(), |_, path| {
        if path.starts_with("/d") {
            Err(boxed(BulkheadFull::new(100, 0)))
        } else {
            Ok(unavailable_for(1))
        }
    });
    let handle = Replayer::http(queue.clone(), svc)
        .jitter(false)
        .max_attempts(1000)
        .poll_interval(Duration::from_millis(100))
        .spawn()
        .unwrap();
    let start = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let stats = handle.shutdown().await;
    // Pauses of 1, 2, 4, 8 and 16 s: the busy backlog held back at most five times.
    assert!(stats.held_back <= 5 * 40, "{stats:?}");
    let calls = calls.lock().unwrap();
    let busy: Vec<_> = calls
        .iter()
        .filter(|(p, _)| p.starts_with("/d"))
        .map(|(_, at)| *at - start)
        .collect();
    assert!(busy.len() <= 5 * 16, "{} calls turned away", busy.len());
    // The busy destination was tried again and again, each time after a longer pause.
    let mut tries: Vec<Duration> = busy.clone();
    tries.dedup();
    assert!(tries.len() >= 4, "busy tried at {tries:?}");
    let gaps: Vec<Duration> = tries.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.windows(2).all(|g| g[1] > g[0]),
        "the pause did not grow: tries at {tries:?}"
    );
    // Meanwhile the flaky destination went on being replayed (its 503 asks for 1 s).
    let flaky = calls.iter().filter(|(p, _)| p.starts_with("/f")).count();
    assert!(
        flaky >= 3 * 40,
        "only {flaky} replays of the other destination"
    );
}

/// A destination's rejection streak is forgotten a while after its last pause: a
/// full limit met hours later starts again at the first step. (It was kept as long
/// as no other destination was paused, and the first brief rejection after an idle
/// spell paused the destination for the 30 s cap.)
#[tokio::test(start_paused = true)]
async fn a_destinations_rejection_streak_is_forgotten_after_a_quiet_spell() {
    let queue = Arc::new(MemoryQueue::new());
    for i in 0..20 {
        let mut e = due_to("busy.test", &format!("d{i}"));
        e.expires_at = Some(SystemTime::now() + Duration::from_secs(60));
        queue.enqueue(e).await.unwrap();
    }
    let turned_away = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let svc = scripted(Calls::default(), {
        let turned_away = turned_away.clone();
        move |_, path| {
            if path.starts_with("/d") || !turned_away.swap(true, Ordering::SeqCst) {
                Err(boxed(BulkheadFull::new(100, 0)))
            } else {
                Ok(respond(200, ""))
            }
        }
    });
    let handle = Replayer::http(queue.clone(), svc)
        .jitter(false)
        .poll_interval(Duration::from_millis(100))
        .spawn()
        .unwrap();
    // A minute of rejections (pauses up to the 30 s cap), then they expire.
    eventually(|| handle.stats().dead_lettered == 20).await;
    tokio::time::sleep(Duration::from_secs(10 * 60)).await;
    queue.enqueue(due_to("busy.test", "n")).await.unwrap();
    let start = tokio::time::Instant::now();
    eventually(|| handle.stats().replayed == 1).await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "paused {:?} for one rejection after a quiet spell",
        start.elapsed()
    );
    handle.shutdown().await;
}

// === Idempotency layer ===

/// What a handler behind the `Idempotency` layer is called with.
type Served = Request<FingerprintedBody<Full<Bytes>>>;

fn slow_handler(
    calls: Arc<AtomicUsize>,
) -> impl Service<Served, Response = Res, Error = std::convert::Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |_req: Served| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let body: &'static str = Box::leak(format!("order #{n}").into_boxed_str());
            Ok(respond(201, body))
        }
    })
}

/// A handler whose first call never ends (hung) and whose later calls answer `201`.
fn hangs_the_first_time(
    calls: Arc<AtomicUsize>,
) -> impl Service<Served, Response = Res, Error = std::convert::Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |_req: Served| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                std::future::pending::<()>().await;
            }
            Ok(respond(201, "order"))
        }
    })
}

fn keyed(key: &str) -> Request<Full<Bytes>> {
    let mut req = post("http://shop.test/orders", "{}");
    req.headers_mut()
        .insert(IDEMPOTENCY_KEY_HEADER, key.parse().unwrap());
    req
}

/// A "try again later" answer (429, 408, 409, 423, 425) or a refused credential (401,
/// 403) is not stored as the key's outcome: the next attempt with the key runs the
/// handler again, as after a 5xx. (401 to 423 were stored for the whole ttl: a retry
/// with a refreshed token got the stale 401.) Nor is a `101 Switching Protocols`,
/// which would replay as a bare `101` without its `Upgrade` header.
#[tokio::test(start_paused = true)]
async fn a_try_again_later_answer_is_not_remembered() {
    for status in [429, 408, 409, 423, 425, 499, 503, 401, 403, 101] {
        let calls = Arc::new(AtomicUsize::new(0));
        let calls2 = calls.clone();
        let handler = service_fn(move |req: Served| {
            let n = calls2.fetch_add(1, Ordering::SeqCst);
            async move {
                // The whole body read: the answer is not left out for being decided
                // from the head alone (which would hide what this test is about).
                req.into_body().collect().await.unwrap();
                Ok::<_, std::convert::Infallible>(if n == 0 {
                    respond(status, "later")
                } else {
                    respond(201, "done")
                })
            }
        });
        let svc = IdempotencyLayer::new(100).layer(handler);
        let first = svc.clone().oneshot(keyed("k1")).await.unwrap();
        assert_eq!(first.status().as_u16(), status);
        let second = svc.clone().oneshot(keyed("k1")).await.unwrap();
        assert_eq!(
            second.status(),
            StatusCode::CREATED,
            "{status} was replayed"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}

/// A ttl and a lock too large for the clock saturate: no panic after the handler ran
/// (which every retry of the request would hit again).
#[tokio::test(start_paused = true)]
async fn huge_ttl_and_lock_do_not_panic() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100)
        .ttl(Duration::MAX)
        .unwrap()
        .lock_for(Duration::MAX)
        .unwrap()
        .layer(slow_handler(calls.clone()));
    for _ in 0..2 {
        let res = svc.clone().oneshot(keyed("k1")).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A body of one data frame, then `trailers` (the shape of a gRPC response).
type WithTrailers = http_body_util::StreamBody<
    tokio_stream::Iter<
        std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::convert::Infallible>>,
    >,
>;

/// A `200` gRPC-style response: `data`, then trailers holding `grpc-status: code`
/// (none for `None`), or the status in the headers for a trailers-only answer.
fn grpc_response(
    data: &'static str,
    code: Option<u8>,
    trailers_only: bool,
) -> Response<WithTrailers> {
    let mut frames = vec![Ok(http_body::Frame::data(Bytes::from_static(
        data.as_bytes(),
    )))];
    let mut res_headers = http::HeaderMap::new();
    res_headers.insert("content-type", "application/grpc".parse().unwrap());
    if let Some(code) = code {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", code.to_string().parse().unwrap());
        if trailers_only {
            res_headers.extend(t);
            frames.clear();
        } else {
            frames.push(Ok(http_body::Frame::trailers(t)));
        }
    }
    let mut res = Response::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)));
    *res.headers_mut() = res_headers;
    res
}

/// A handler answering call `n` (0-based) with `answer(n)`, counting calls.
fn grpc_handler(
    calls: Arc<AtomicUsize>,
    answer: fn(usize) -> Response<WithTrailers>,
) -> impl Service<
    Served,
    Response = Response<WithTrailers>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |req: Served| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            // The message read first, as a unary handler does: its answer is decided
            // by the whole request (one made from the head alone is not remembered).
            req.into_body().collect().await.unwrap();
            Ok(answer(n))
        }
    })
}

/// A response whose body ends with trailers (every gRPC response) is remembered with
/// them and replayed with them: without trailers, a gRPC client reads the replay as a
/// failure. (Before, such a response was never remembered, so the layer de-duplicated
/// no gRPC call.)
#[tokio::test(start_paused = true)]
async fn a_response_with_trailers_is_remembered_with_them() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100).layer(grpc_handler(calls.clone(), |_| {
        grpc_response("pong", Some(0), false)
    }));
    let first = svc.clone().oneshot(keyed("k1")).await.unwrap();
    let first = first.into_body().collect().await.unwrap();
    assert_eq!(first.trailers().unwrap()["grpc-status"], "0");
    let second = svc.clone().oneshot(keyed("k1")).await.unwrap();
    assert!(second.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(second.headers()["content-type"], "application/grpc");
    let second = second.into_body().collect().await.unwrap();
    assert_eq!(second.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(second.to_bytes(), "pong");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A gRPC call that failed on the server's side or was told to try again
/// (`UNAVAILABLE`, `INTERNAL`, `RESOURCE_EXHAUSTED`, …, or no status at all) is not
/// remembered, whether its status is in the trailers or, trailers-only, in the headers
/// of a `200 OK`; the caller's own errors (`INVALID_ARGUMENT`, …) are, like a `4xx`.
#[tokio::test(start_paused = true)]
async fn a_grpc_failure_status_is_not_remembered() {
    let unavailable_in_trailers: fn(usize) -> Response<WithTrailers> = |n| match n {
        0 => grpc_response("", Some(14), false),
        _ => grpc_response("pong", Some(0), false),
    };
    let internal_in_headers: fn(usize) -> Response<WithTrailers> = |n| match n {
        0 => grpc_response("", Some(13), true),
        _ => grpc_response("pong", Some(0), false),
    };
    let no_status: fn(usize) -> Response<WithTrailers> = |n| match n {
        0 => grpc_response("half", None, false),
        _ => grpc_response("pong", Some(0), false),
    };
    let exhausted: fn(usize) -> Response<WithTrailers> = |n| match n {
        0 => grpc_response("", Some(8), false),
        _ => grpc_response("pong", Some(0), false),
    };
    for (case, answer) in [
        ("UNAVAILABLE in trailers", unavailable_in_trailers),
        ("INTERNAL trailers-only", internal_in_headers),
        ("no status", no_status),
        ("RESOURCE_EXHAUSTED", exhausted),
    ] {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = IdempotencyLayer::new(100).layer(grpc_handler(calls.clone(), answer));
        let first = svc.clone().oneshot(keyed("k1")).await.unwrap();
        drop(first.into_body().collect().await.unwrap());
        let second = svc.clone().oneshot(keyed("k1")).await.unwrap();
        assert!(
            !second.headers().contains_key(REPLAYED_HEADER),
            "{case} was replayed"
        );
        let second = second.into_body().collect().await.unwrap();
        assert_eq!(second.trailers().unwrap()["grpc-status"], "0", "{case}");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "{case}");
    }
    // INVALID_ARGUMENT is the caller's error: remembered.
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100).layer(grpc_handler(calls.clone(), |n| match n {
        0 => grpc_response("", Some(3), true),
        _ => grpc_response("pong", Some(0), false),
    }));
    svc.clone().oneshot(keyed("k1")).await.unwrap();
    let second = svc.clone().oneshot(keyed("k1")).await.unwrap();
    assert!(second.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(second.headers()["grpc-status"], "3");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A gRPC call answered by something that is no gRPC server (a `200` HTML fallback, a
/// `404` page) has no status: its client reads `UNKNOWN`, `UNIMPLEMENTED` …, failures,
/// and so it is not remembered, as a gRPC answer without a status is not. (It was judged
/// by HTTP's rules and replayed for the whole ttl.)
#[tokio::test(start_paused = true)]
async fn a_grpc_call_answered_without_a_grpc_status_is_not_remembered() {
    for status in [200, 404] {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let svc = IdempotencyLayer::new(100).layer(service_fn(move |req: Served| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                req.into_body().collect().await.unwrap();
                let mut res = Response::new(Full::new(Bytes::from_static(b"<html></html>")));
                *res.status_mut() = StatusCode::from_u16(status).unwrap();
                res.headers_mut()
                    .insert("content-type", "text/html".parse().unwrap());
                Ok::<_, std::convert::Infallible>(res)
            }
        }));
        let grpc = || {
            let mut req = keyed("k1");
            req.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            req
        };
        let first = svc.clone().oneshot(grpc()).await.unwrap();
        drop(first.into_body().collect().await.unwrap());
        let second = svc.clone().oneshot(grpc()).await.unwrap();
        assert!(
            !second.headers().contains_key(REPLAYED_HEADER),
            "{status} was replayed"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2, "{status}");
        // The same answers to a plain HTTP request are remembered.
        let plain = svc.clone().oneshot(keyed("k2")).await.unwrap();
        drop(plain.into_body().collect().await.unwrap());
        let again = svc.clone().oneshot(keyed("k2")).await.unwrap();
        assert!(again.headers().contains_key(REPLAYED_HEADER), "{status}");
    }
}

/// A binary gRPC-Web answer: a message frame, then the trailers frame (flag `0x80`)
/// holding `grpc-status: code`, all in the body.
fn grpc_web_response(code: u8) -> Response<Full<Bytes>> {
    let mut body = vec![0, 0, 0, 0, 4];
    body.extend_from_slice(b"pong");
    let trailers = format!("grpc-status: {code}\r\n");
    body.push(0x80);
    body.extend_from_slice(&u32::try_from(trailers.len()).unwrap().to_be_bytes());
    body.extend_from_slice(trailers.as_bytes());
    let mut res = Response::new(Full::new(Bytes::from(body)));
    res.headers_mut().insert(
        "content-type",
        "application/grpc-web+proto".parse().unwrap(),
    );
    res
}

/// gRPC-Web carries its status in the body's trailers frame: an `OK` answer is
/// remembered and replayed byte for byte, an `UNAVAILABLE` one is not (every gRPC-Web
/// answer was taken for one without a status, and never remembered).
#[tokio::test(start_paused = true)]
async fn a_grpc_web_answer_is_judged_by_the_status_in_its_body() {
    for (code, remembered) in [(0, true), (14, false)] {
        let what = format!("status {code}");
        assert_remembered(
            move || grpc_web_response(code),
            || keyed("k1"),
            remembered,
            &what,
        )
        .await;
    }
}

/// Sends `request()` twice, under its key, to a handler answering `answer()`: the
/// second is answered from the store, byte for byte, and the handler ran once, if
/// (and only if) the first answer is `remembered`.
async fn assert_remembered(
    answer: impl Fn() -> Response<Full<Bytes>> + Clone + Send + 'static,
    request: impl Fn() -> Request<Full<Bytes>>,
    remembered: bool,
    what: &str,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100).layer(service_fn({
        let calls = calls.clone();
        move |_req: Served| {
            calls.fetch_add(1, Ordering::SeqCst);
            let res = answer();
            async move { Ok::<_, std::convert::Infallible>(res) }
        }
    }));
    let first = svc.clone().oneshot(request()).await.unwrap();
    let first = first.into_body().collect().await.unwrap().to_bytes();
    let second = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(
        second.headers().contains_key(REPLAYED_HEADER),
        remembered,
        "{what}"
    );
    let second = second.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(second, first, "{what}");
    let want = if remembered { 1 } else { 2 };
    assert_eq!(calls.load(Ordering::SeqCst), want, "{what}");
}

/// A Connect-protocol stream's answer (`200 OK`, `application/connect+json`): a message,
/// then the end-of-stream message (flag `0x02`) with `end`'s JSON.
fn connect_stream_response(end: &str) -> Response<Full<Bytes>> {
    let mut body = vec![0, 0, 0, 0, 2];
    body.extend_from_slice(b"{}");
    body.push(0x02);
    body.extend_from_slice(&u32::try_from(end.len()).unwrap().to_be_bytes());
    body.extend_from_slice(end.as_bytes());
    let mut res = Response::new(Full::new(Bytes::from(body)));
    res.headers_mut()
        .insert("content-type", "application/connect+json".parse().unwrap());
    res
}

/// A Connect stream is always `200 OK` and carries its outcome in the end-of-stream
/// message: one ending without an error, or with the caller's own, is remembered; one
/// ending in a server-side failure (`unavailable`, `internal`) or an unreadable end is
/// not (stored, the failure was replayed to every retry for the ttl).
#[tokio::test(start_paused = true)]
async fn a_connect_stream_is_judged_by_its_end_of_stream_message() {
    let cases = [
        ("{}", true),
        (r#"{"metadata":{"error":["none"]}}"#, true),
        (
            r#"{"error":{"code":"not_found","message":"no such order"}}"#,
            true,
        ),
        (
            r#"{"error":{"code":"unavailable","message":"database down"}}"#,
            false,
        ),
        (r#"{"error":{"code":"internal"}}"#, false),
        (r#"{"error":{}}"#, false),
        ("not json", false),
    ];
    for (end, remembered) in cases {
        let stream = || {
            let mut req = keyed("k1");
            req.headers_mut()
                .insert("content-type", "application/connect+json".parse().unwrap());
            req
        };
        assert_remembered(
            move || connect_stream_response(end),
            stream,
            remembered,
            end,
        )
        .await;
    }
}

/// A Connect stream answered with its end-of-stream message alone, with the caller's
/// error (`invalid_argument`), before the handler read the whole request (an
/// interceptor's refusal) is its trailers-only answer: not remembered, so a corrected
/// repeat under the key runs. After a message, or once the request was read, it is.
#[tokio::test(start_paused = true)]
async fn a_connect_streams_refusal_before_the_body_was_read_is_not_remembered() {
    let refusal = r#"{"error":{"code":"invalid_argument"}}"#;
    for (read_body, remembered) in [(false, false), (true, true)] {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = IdempotencyLayer::new(100).layer(service_fn({
            let calls = calls.clone();
            move |req: Served| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if read_body {
                        req.into_body().collect().await.unwrap();
                    }
                    let mut body = vec![0x02];
                    body.extend_from_slice(&u32::try_from(refusal.len()).unwrap().to_be_bytes());
                    body.extend_from_slice(refusal.as_bytes());
                    let mut res = Response::new(Full::new(Bytes::from(body)));
                    res.headers_mut()
                        .insert("content-type", "application/connect+json".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(res)
                }
            }
        }));
        for _ in 0..2 {
            let res = svc.clone().oneshot(keyed("k1")).await.unwrap();
            drop(res.into_body().collect().await.unwrap());
        }
        let want = if remembered { 1 } else { 2 };
        assert_eq!(
            calls.load(Ordering::SeqCst),
            want,
            "read the body: {read_body}"
        );
    }
}

/// A Connect stream cut short, without its end-of-stream message, is an error to its
/// client: not remembered.
#[tokio::test(start_paused = true)]
async fn a_connect_stream_without_its_end_is_not_remembered() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100).layer(service_fn({
        let calls = calls.clone();
        move |_req: Served| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut res =
                    Response::new(Full::new(Bytes::from_static(&[0, 0, 0, 0, 2, b'{', b'}'])));
                res.headers_mut()
                    .insert("content-type", "application/connect+proto".parse().unwrap());
                Ok::<_, std::convert::Infallible>(res)
            }
        }
    }));
    for _ in 0..2 {
        let res = svc.clone().oneshot(keyed("k1")).await.unwrap();
        assert!(!res.headers().contains_key(REPLAYED_HEADER));
        drop(res.into_body().collect().await.unwrap());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A handler that reads the whole request body and answers `201` with it.
fn echo_handler(
    calls: Arc<AtomicUsize>,
) -> impl Service<Served, Response = Res, Error = std::convert::Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(move |req: Served| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut res = Response::new(Full::new(body));
            *res.status_mut() = StatusCode::CREATED;
            Ok(res)
        }
    })
}

fn keyed_with(key: &str, uri: &str, body: &'static str) -> Request<Full<Bytes>> {
    let mut req = post(uri, body);
    req.headers_mut()
        .insert(IDEMPOTENCY_KEY_HEADER, key.parse().unwrap());
    req
}

/// A key reused for a different request (another body or query: a client bug) is
/// answered `422` with a problem document, not with the first request's response; a
/// true repeat is still replayed. (Before, the second order was silently dropped: its
/// caller got the first order's `201`.)
#[tokio::test(start_paused = true)]
async fn a_key_reused_for_a_different_request_is_refused_with_422() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100).layer(echo_handler(calls.clone()));
    let uri = "http://shop.test/orders?tenant=1";
    let first = svc
        .clone()
        .oneshot(keyed_with("k", uri, r#"{"sku":1}"#))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    for (uri, body) in [
        (uri, r#"{"sku":2}"#),
        (uri, r#"{"sku":1} "#),
        ("http://shop.test/orders?tenant=2", r#"{"sku":1}"#),
    ] {
        let res = svc
            .clone()
            .oneshot(keyed_with("k", uri, body))
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{uri} {body}"
        );
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let doc = bytes_of(res.into_body()).await;
        assert!(String::from_utf8_lossy(&doc).contains("Idempotency-Key is already used"));
    }
    let again = svc
        .clone()
        .oneshot(keyed_with("k", uri, r#"{"sku":1}"#))
        .await
        .unwrap();
    assert!(again.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(bytes_of(again.into_body()).await, r#"{"sku":1}"#);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// The layer's own refusals of a gRPC request are gRPC statuses, trailers-only: a
/// gRPC client reads an HTTP `422` or `409` as `UNKNOWN`, so "retry later" looked like
/// a failure and its `Retry-After` was lost. A key reused by another request is
/// `INVALID_ARGUMENT`; a duplicate still in progress is `UNAVAILABLE` with
/// `grpc-retry-pushback-ms`.
#[tokio::test(start_paused = true)]
async fn the_layers_own_refusals_of_a_grpc_request_are_grpc_statuses() {
    let grpc = |body: &'static str| {
        let mut req = keyed_with("k", "http://shop.test/shop.Orders/Place", body);
        req.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        req
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100).layer(grpc_handler(calls.clone(), |_| {
        grpc_response("pong", Some(0), false)
    }));
    let first = svc.clone().oneshot(grpc("a")).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    drop(first.into_body().collect().await.unwrap());
    let reused = svc.clone().oneshot(grpc("b")).await.unwrap();
    assert_eq!(reused.status(), StatusCode::OK);
    assert_eq!(reused.headers()["content-type"], "application/grpc");
    assert_eq!(reused.headers()["grpc-status"], "3");
    let message = reused.headers()["grpc-message"].to_str().unwrap();
    assert!(message.contains("different request"), "{message}");
    assert!(bytes_of(reused.into_body()).await.is_empty());

    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100)
        .lock_for(Duration::from_secs(5))
        .unwrap()
        .layer(hangs_the_first_time(calls.clone()));
    let hung = tokio::spawn(svc.clone().oneshot(grpc("{}")));
    tokio::task::yield_now().await; // the spawned request claims the key first
    let res = svc.clone().oneshot(grpc("{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "14");
    assert_eq!(res.headers()["grpc-retry-pushback-ms"], "1000");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    hung.abort();
}

/// One layer serving two virtual hosts keeps their keys apart: the same key, path and
/// body sent to another host is another operation, and runs. (The stored key had no
/// host: `b.test`'s order got `a.test`'s answer.) Hosts compare without regard to
/// case, and a `Host` header counts as the URI's authority does.
#[tokio::test(start_paused = true)]
async fn the_same_key_on_another_host_is_another_operation() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100).layer(echo_handler(calls.clone()));
    let a = svc
        .clone()
        .oneshot(keyed_with("k", "http://a.test/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(a.status(), StatusCode::CREATED);
    let b = svc
        .clone()
        .oneshot(keyed_with("k", "http://b.test/orders", "{}"))
        .await
        .unwrap();
    assert!(
        !b.headers().contains_key(REPLAYED_HEADER),
        "a.test's answer"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let again = svc
        .clone()
        .oneshot(keyed_with("k", "http://A.Test/orders", "{}"))
        .await
        .unwrap();
    assert!(again.headers().contains_key(REPLAYED_HEADER));
    // A server sees origin-form URIs and the `Host` header.
    let mut via_header = keyed_with("k", "/orders", "{}");
    via_header
        .headers_mut()
        .insert(http::header::HOST, "b.test".parse().unwrap());
    let again = svc.oneshot(via_header).await.unwrap();
    assert!(again.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The IETF draft's form of the key is a structured-field string, `"k"`; most clients
/// send it bare, `k`. The two are one key: a retry through a client that writes the
/// other form is still a duplicate, not a second order.
#[tokio::test(start_paused = true)]
async fn a_quoted_key_and_the_same_key_bare_are_one_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100).layer(echo_handler(calls.clone()));
    let first = svc
        .clone()
        .oneshot(keyed_with("\"order-7\"", "http://a.test/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    for repeat in ["order-7", "\"order-7\";v=1", " \"order-7\" "] {
        let res = svc
            .clone()
            .oneshot(keyed_with(repeat, "http://a.test/orders", "{}"))
            .await
            .unwrap();
        assert!(res.headers().contains_key(REPLAYED_HEADER), "{repeat}");
    }
    // An escaped quote inside is the quote itself.
    let escaped = svc
        .clone()
        .oneshot(keyed_with("\"a\\\"b\"", "http://a.test/orders", "{}"))
        .await
        .unwrap();
    assert!(!escaped.headers().contains_key(REPLAYED_HEADER));
    let res = svc
        .clone()
        .oneshot(keyed_with("a\"b", "http://a.test/orders", "{}"))
        .await
        .unwrap();
    assert!(res.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A handler that does not read the request body (it answers from the head) leaves a
/// fingerprint of the head alone:
/// a repeat with another body is replayed (its body is not compared), but one with
/// another query or content type is another request, `422` — not the stale answer.
#[tokio::test(start_paused = true)]
async fn without_the_body_read_repeats_are_compared_by_their_heads() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100).layer(slow_handler(calls.clone()));
    svc.clone()
        .oneshot(keyed_with("k", "http://shop.test/orders", "a"))
        .await
        .unwrap();
    let res = svc
        .clone()
        .oneshot(keyed_with("k", "http://shop.test/orders", "b"))
        .await
        .unwrap();
    assert!(res.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let other_query = svc
        .clone()
        .oneshot(keyed_with("k", "http://shop.test/orders?dry_run=1", "a"))
        .await
        .unwrap();
    assert_eq!(other_query.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let mut other_type = keyed_with("k", "http://shop.test/orders", "a");
    other_type
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    let res = svc.clone().oneshot(other_type).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A duplicate waits for its key at most `lock_for` in all, however often the key comes
/// free and another duplicate claims it (a handler that keeps failing): then it is
/// answered `409 Conflict`, as the IETF draft says for a request still in progress,
/// instead of waiting round after round.
#[tokio::test(start_paused = true)]
async fn a_duplicate_waits_at_most_lock_for_in_all() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let failing = service_fn(move |_req: Served| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(6)).await;
            Ok::<_, std::convert::Infallible>(respond(503, "busy"))
        }
    });
    let svc = IdempotencyLayer::new(100)
        .lock_for(Duration::from_secs(10))
        .unwrap()
        .layer(failing);
    let (a, b, c) = tokio::join!(
        svc.clone().oneshot(keyed("k")),
        svc.clone().oneshot(keyed("k")),
        svc.clone().oneshot(keyed("k")),
    );
    let responses = [a, b, c].map(Result::unwrap);
    let conflict = responses.iter().find(|r| r.status() == 409).expect("a 409");
    assert_eq!(conflict.headers()[http::header::RETRY_AFTER], "1");
    let mut statuses = responses.map(|r| r.status().as_u16());
    statuses.sort_unstable();
    assert_eq!(statuses, [409, 503, 503]);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A request whose handler hangs keeps its key while its client waits (its claim is
/// renewed: a handler still running may yet make its effect): a duplicate that came at
/// the same instant waits `lock_for`, then is answered `409`. Once the hung request's
/// client goes away, its claim ends within `lock_for` and the next duplicate takes the
/// key over.
#[tokio::test(start_paused = true)]
async fn a_hung_claim_is_kept_while_its_client_waits_and_taken_over_after_it_leaves() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = hangs_the_first_time(calls.clone());
    let svc = IdempotencyLayer::new(100)
        .lock_for(Duration::from_secs(5))
        .unwrap()
        .layer(handler);
    let hung = tokio::spawn(svc.clone().oneshot(keyed("k")));
    tokio::task::yield_now().await; // the spawned request claims the key first
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let started = tokio::time::Instant::now();
    let res = svc.clone().oneshot(keyed("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    hung.abort();
    let started = tokio::time::Instant::now();
    let res = svc.oneshot(keyed("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(
        started.elapsed() <= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A handler slower than `lock_for` keeps its key while its client waits: its claim is
/// renewed, so a duplicate that comes after `lock_for` waits for the answer instead of
/// running the handler a second time beside it.
#[tokio::test(start_paused = true)]
async fn a_handler_slower_than_lock_for_keeps_its_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let slow = service_fn(move |_req: Served| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(25)).await;
            Ok::<_, std::convert::Infallible>(respond(201, "order"))
        }
    });
    let svc = IdempotencyLayer::new(100)
        .lock_for(Duration::from_secs(10))
        .unwrap()
        .layer(slow);
    let first = tokio::spawn(svc.clone().oneshot(keyed("k")));
    // Past the first claim's `lock_for`; the answer comes within the duplicate's own.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let duplicate = svc.oneshot(keyed("k")).await.unwrap();
    assert_eq!(duplicate.status(), StatusCode::CREATED);
    assert!(duplicate.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn concurrent_duplicates_run_the_handler_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100).layer(slow_handler(calls.clone()));
    let (a, b) = tokio::join!(
        svc.clone().oneshot(keyed("k1")),
        svc.clone().oneshot(keyed("k1"))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        (a.status(), b.status()),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    let replayed = [&a, &b]
        .iter()
        .filter(|r| r.headers().contains_key(REPLAYED_HEADER))
        .count();
    assert_eq!(replayed, 1);
    assert_eq!(bytes_of(a.into_body()).await, bytes_of(b.into_body()).await);

    let later = svc.clone().oneshot(keyed("k1")).await.unwrap();
    assert_eq!(bytes_of(later.into_body()).await, "order #1");
    svc.oneshot(keyed("k2")).await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "another key runs the handler"
    );
}

/// Polled inline with no tokio runtime (the layer supports it: no timers then), a
/// duplicate waits for the first request's answer and replays it; waiting panicked
/// building a timer with no runtime to drive it.
#[test]
fn a_duplicate_polled_without_a_runtime_waits_for_the_first_answer() {
    // `MemoryStore` wakes the duplicate when the first is answered.
    duplicate_waits_inline(Arc::new(MemoryStore::new(100)), true);
}

/// A store of its own that keeps the default `wait`, polled without a runtime: the
/// duplicate waits for the first answer as with `MemoryStore`. (The default `wait` made
/// a Tokio timer there, and panicked: "there is no reactor running".)
#[test]
fn a_store_with_the_default_wait_polled_without_a_runtime_does_not_panic() {
    duplicate_waits_inline(
        Arc::new(SharedLike(MemoryStore::new(100), Renewal::Unsupported)),
        false,
    );
}

/// Two requests with one key through the layer on `store`, polled inline with no tokio
/// runtime, the first answered only once told: the duplicate waits, then replays the
/// first answer. With `woken`, the store wakes the duplicate when the first is
/// answered; without, the duplicate polls.
fn duplicate_waits_inline<St: IdempotencyStore + Send + Sync + 'static>(
    store: Arc<St>,
    woken: bool,
) {
    let (answer, answered) = tokio::sync::oneshot::channel::<()>();
    let answered = Arc::new(std::sync::Mutex::new(Some(answered)));
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::with_store(store).layer(service_fn({
        let calls = calls.clone();
        move |_req: Served| {
            calls.fetch_add(1, Ordering::SeqCst);
            let wait = answered.lock().unwrap().take();
            async move {
                if let Some(wait) = wait {
                    let _ = wait.await;
                }
                Ok::<_, std::convert::Infallible>(respond(201, "order #1"))
            }
        }
    }));
    let mut first = tokio_test::task::spawn(svc.clone().oneshot(keyed("k")));
    assert!(first.poll().is_pending());
    let mut duplicate = tokio_test::task::spawn(svc.clone().oneshot(keyed("k")));
    assert!(duplicate.poll().is_pending());
    assert!(duplicate.poll().is_pending(), "still in progress");
    answer.send(()).unwrap();
    let std::task::Poll::Ready(first) = first.poll() else {
        panic!("the first request did not end once answered")
    };
    assert_eq!(first.unwrap().status(), StatusCode::CREATED);
    if woken {
        assert!(duplicate.is_woken());
    }
    let mut polls = 0;
    let duplicate = loop {
        if let std::task::Poll::Ready(out) = duplicate.poll() {
            break out.unwrap();
        }
        polls += 1;
        assert!(
            polls < 10 && !woken,
            "the duplicate did not end once the first was answered"
        );
    };
    assert_eq!(duplicate.status(), StatusCode::CREATED);
    assert!(duplicate.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A store that cannot be reached: every call fails.
struct Unreachable;

impl IdempotencyStore for Unreachable {
    fn claim(&self, _: &str, _: Duration) -> impl Future<Output = Result<Claim, BoxError>> + Send {
        std::future::ready(Err("store down".into()))
    }

    fn complete(
        &self,
        _: &str,
        _: ClaimToken,
        _: StoredResponse,
        _: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        std::future::ready(Err("store down".into()))
    }

    fn release(&self, _: &str, _: ClaimToken) {}
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_store_fails_open_and_runs_every_request() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc =
        IdempotencyLayer::with_store(Arc::new(Unreachable)).layer(slow_handler(calls.clone()));
    for n in 1..=2 {
        let res = svc.clone().oneshot(keyed("k")).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        assert!(!res.headers().contains_key(REPLAYED_HEADER));
        assert_eq!(bytes_of(res.into_body()).await, format!("order #{n}"));
    }
}

/// A `MemoryStore` whose third claim fails (a blip of a shared store).
struct BlipsOnThirdClaim(MemoryStore, AtomicUsize);

impl IdempotencyStore for BlipsOnThirdClaim {
    fn claim(
        &self,
        key: &str,
        lock_for: Duration,
    ) -> impl Future<Output = Result<Claim, BoxError>> + Send {
        let n = self.1.fetch_add(1, Ordering::SeqCst) + 1;
        let claimed = self.0.claim(key, lock_for);
        async move {
            if n == 3 {
                return Err("connection reset".into());
            }
            claimed.await
        }
    }

    fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.0.complete(key, token, response, ttl)
    }

    fn release(&self, key: &str, token: ClaimToken) {
        self.0.release(key, token);
    }

    fn wait(&self, key: &str) -> impl Future<Output = ()> + Send {
        self.0.wait(key)
    }
}

/// A duplicate waiting for the key's first request whose next claim fails (a blip of
/// a shared store) waits on: it gets the first request's answer, and the handler runs
/// once. It failed open, running the handler beside the first: the effect twice.
#[tokio::test(start_paused = true)]
async fn a_store_blip_while_a_duplicate_waits_does_not_run_the_handler_twice() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(BlipsOnThirdClaim(
        MemoryStore::default(),
        AtomicUsize::new(0),
    ));
    let svc = IdempotencyLayer::with_store(store).layer(slow_handler(calls.clone()));
    let first = tokio::spawn(svc.clone().oneshot(keyed("k")));
    tokio::task::yield_now().await;
    let duplicate = tokio::spawn(svc.clone().oneshot(keyed("k")));
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let duplicate = duplicate.await.unwrap().unwrap();
    assert_eq!(duplicate.status(), StatusCode::CREATED);
    assert!(duplicate.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran twice");
}

/// How a [`SharedLike`] store renews a claim.
enum Renewal {
    /// As the trait's default: it cannot (`Ok(false)`).
    Unsupported,
    /// The first renewal fails (a dropped connection), the rest renew as a
    /// `MemoryStore` does.
    FailsOnce(std::sync::atomic::AtomicBool),
    /// No renewal is ever answered.
    Hangs,
}

/// A store like most shared ones: no wake-ups, so it relies on the trait's default
/// `wait` (a poll every 50 ms), and claim renewals as its [`Renewal`] says. Its
/// answers are kept in a `MemoryStore`.
struct SharedLike(MemoryStore, Renewal);

impl IdempotencyStore for SharedLike {
    fn claim(
        &self,
        key: &str,
        lock_for: Duration,
    ) -> impl Future<Output = Result<Claim, BoxError>> + Send {
        self.0.claim(key, lock_for)
    }

    fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.0.complete(key, token, response, ttl)
    }

    fn release(&self, key: &str, token: ClaimToken) {
        self.0.release(key, token);
    }

    async fn extend(
        &self,
        key: &str,
        token: ClaimToken,
        lock_for: Duration,
    ) -> Result<bool, BoxError> {
        match &self.1 {
            Renewal::Unsupported => Ok(false),
            Renewal::FailsOnce(failed) if !failed.swap(true, Ordering::SeqCst) => {
                Err("connection reset".into())
            }
            Renewal::FailsOnce(_) => self.0.extend(key, token, lock_for).await,
            Renewal::Hangs => std::future::pending().await,
        }
    }
}

/// A renewal the store never answers is given up on when the claim ends: the handler
/// (not polled while the renewal is awaited) goes on and its answer comes back. It
/// hung for as long as the store did.
#[tokio::test(start_paused = true)]
async fn a_renewal_the_store_never_answers_does_not_hang_the_handler() {
    let slow = service_fn(|_req: Served| async {
        tokio::time::sleep(Duration::from_secs(25)).await;
        Ok::<_, std::convert::Infallible>(respond(201, "order"))
    });
    let svc =
        IdempotencyLayer::with_store(Arc::new(SharedLike(MemoryStore::default(), Renewal::Hangs)))
            .lock_for(Duration::from_secs(10))
            .unwrap()
            .layer(slow);
    let res = tokio::time::timeout(Duration::from_secs(120), svc.oneshot(keyed("k")))
        .await
        .expect("the handler hung on the renewal")
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
}

/// One failed renewal does not give the key away: the claim is renewed again before
/// it ends, so a duplicate that comes after `lock_for` waits for the slow handler's
/// answer instead of running it a second time. (Renewal stopped for good after one
/// error.)
#[tokio::test(start_paused = true)]
async fn one_failed_renewal_does_not_give_the_key_away() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let slow = service_fn(move |_req: Served| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(25)).await;
            Ok::<_, std::convert::Infallible>(respond(201, "order"))
        }
    });
    let store = Arc::new(SharedLike(
        MemoryStore::default(),
        Renewal::FailsOnce(Default::default()),
    ));
    let svc = IdempotencyLayer::with_store(store)
        .lock_for(Duration::from_secs(10))
        .unwrap()
        .layer(slow);
    let first = tokio::spawn(svc.clone().oneshot(keyed("k")));
    tokio::time::sleep(Duration::from_secs(16)).await;
    let duplicate = svc.oneshot(keyed("k")).await.unwrap();
    assert_eq!(duplicate.status(), StatusCode::CREATED);
    assert!(duplicate.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// With a store that polls (the trait's default `wait`, every 50 ms), a duplicate whose
/// last poll sleeps past its bound still takes over the hung claim that ended before:
/// the key is claimed once more before the `409`.
#[tokio::test(start_paused = true)]
async fn a_polling_store_still_lets_a_duplicate_take_over_a_hung_claim() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = hangs_the_first_time(calls.clone());
    let store = Arc::new(SharedLike(MemoryStore::default(), Renewal::Unsupported));
    let svc = IdempotencyLayer::with_store(store)
        .lock_for(Duration::from_millis(5020))
        .unwrap()
        .layer(handler);
    let hung = tokio::spawn(svc.clone().oneshot(keyed("k")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Polls at 10 ms + 50 ms × n: 5010 ms (claimed), then 5060 ms, past the bound
    // (5030 ms); the claim ended at 5020 ms.
    let res = svc.oneshot(keyed("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    hung.abort();
}

/// The `409` for a duplicate that waited its whole bound carries `Retry-After`: the
/// replayer retries it rather than dead-lettering the message.
#[tokio::test(start_paused = true)]
async fn an_in_progress_answer_is_retried_by_the_replayer() {
    let queue = Arc::new(MemoryQueue::new());
    enqueue_raw(&queue, "http://api.test/orders").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let svc = service_fn(move |_req: InnerReq| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = respond(if n == 0 { 409 } else { 201 }, "");
            res.headers_mut()
                .insert(http::header::RETRY_AFTER, "1".parse().unwrap());
            Ok::<_, BoxError>(res)
        }
    });
    let handle = Replayer::http(queue.clone(), svc).spawn().unwrap();
    eventually(|| handle.stats().replayed == 1).await;
    let stats = handle.shutdown().await;
    assert_eq!((stats.retried, stats.dead_lettered), (1, 0));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_store_without_wake_ups_still_runs_concurrent_duplicates_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(SharedLike(MemoryStore::default(), Renewal::Unsupported));
    let svc = IdempotencyLayer::with_store(store).layer(slow_handler(calls.clone()));
    let start = tokio::time::Instant::now();
    let (a, b) = tokio::join!(
        svc.clone().oneshot(keyed("k")),
        svc.clone().oneshot(keyed("k"))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        [&a, &b]
            .iter()
            .filter(|r| r.headers().contains_key(REPLAYED_HEADER))
            .count(),
        1
    );
    assert_eq!(bytes_of(a.into_body()).await, bytes_of(b.into_body()).await);
    // The duplicate answered within one poll of the first's 1 s.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took <= Duration::from_millis(1050),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_key_pass_through() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100).layer(slow_handler(calls.clone()));
    for _ in 0..2 {
        let res = svc
            .clone()
            .oneshot(post("http://shop.test/orders", "{}"))
            .await
            .unwrap();
        assert!(!res.headers().contains_key(REPLAYED_HEADER));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn server_errors_are_not_remembered_and_responses_expire() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handler = service_fn(move |_req: Served| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, std::convert::Infallible>(respond(if n == 0 { 500 } else { 201 }, "")) }
    });
    let svc = IdempotencyLayer::new(100)
        .ttl(Duration::from_secs(60))
        .unwrap()
        .layer(handler);
    assert_eq!(
        svc.clone().oneshot(keyed("k")).await.unwrap().status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        svc.clone().oneshot(keyed("k")).await.unwrap().status(),
        StatusCode::CREATED
    );
    svc.clone().oneshot(keyed("k")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the 201 was remembered");
    tokio::time::advance(Duration::from_secs(61)).await;
    svc.oneshot(keyed("k")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3, "expired after the TTL");
}

/// A response body whose one frame comes only after `sleep`: a handler that has answered
/// and is still writing its body.
struct LateBody {
    sleep: Pin<Box<tokio::time::Sleep>>,
    data: Option<Bytes>,
    /// Dropped with the body (to see when it is).
    _held: Option<Arc<()>>,
}

impl http_body::Body for LateBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::ready!(self.sleep.as_mut().poll(cx));
        std::task::Poll::Ready(self.data.take().map(|d| Ok(http_body::Frame::data(d))))
    }
}

/// The client goes away after the handler answered but before the body was read (a
/// caller that timed out and will retry): the outcome is still stored, and the
/// duplicate gets it instead of running the handler a second time.
#[tokio::test(start_paused = true)]
async fn a_request_dropped_after_the_handler_answered_still_stores_the_outcome() {
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let handler = service_fn(move |_req: Served| {
        calls2.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = LateBody {
                sleep: Box::pin(tokio::time::sleep(Duration::from_secs(1))),
                data: Some(Bytes::from_static(b"order #1")),
                _held: None,
            };
            let mut res = Response::new(body);
            *res.status_mut() = StatusCode::CREATED;
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    let mut svc = IdempotencyLayer::new(100).layer(handler);
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let mut first = task::spawn(svc.call(keyed("k")));
    assert_pending!(first.poll());
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler answered");
    drop(first);
    let res = svc.clone().oneshot(keyed("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(res.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(bytes_of(res.into_body()).await, "order #1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A client that went away while the response body never ends does not keep the task
/// reading it past `lock_for`: the body is dropped then.
#[tokio::test(start_paused = true)]
async fn a_body_that_never_ends_is_dropped_lock_for_after_the_client_left() {
    let alive = Arc::new(());
    let held = alive.clone();
    let handler = service_fn(move |_req: Served| {
        let held = held.clone();
        async move {
            let body = LateBody {
                sleep: Box::pin(tokio::time::sleep(Duration::from_secs(365 * 24 * 3600))),
                data: Some(Bytes::from_static(b"never")),
                _held: Some(held),
            };
            Ok::<_, std::convert::Infallible>(Response::new(body))
        }
    });
    let mut svc = IdempotencyLayer::new(100)
        .lock_for(Duration::from_secs(5))
        .unwrap()
        .layer(handler);
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let mut first = task::spawn(svc.call(keyed("k")));
    assert_pending!(first.poll());
    drop((first, svc)); // the client goes away (and the handler with its own clone)
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        Arc::strong_count(&alive) > 1,
        "the answer is read to be stored while the claim lasts"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(Arc::strong_count(&alive), 1, "the body is still being read");
}

/// A handler that would finish in the very tick its claim ends, after its client left,
/// is cut off then: past the claim a duplicate may take the key over in that same tick.
/// (The handler was polled first, and made its effect after the claim had ended.)
#[tokio::test(start_paused = true)]
async fn a_handler_is_not_polled_past_its_claim_once_its_client_left() {
    let done = Arc::new(AtomicUsize::new(0));
    let done2 = done.clone();
    let handler = service_fn(move |_req: Served| {
        let done = done2.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            done.fetch_add(1, Ordering::SeqCst); // the effect
            Ok::<_, std::convert::Infallible>(respond(201, "order #1"))
        }
    });
    let mut svc = IdempotencyLayer::new(100)
        .lock_for(Duration::from_secs(5))
        .unwrap()
        .layer(handler);
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let mut first = task::spawn(svc.call(keyed("k")));
    assert_pending!(first.poll());
    drop(first); // the client goes away
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(done.load(Ordering::SeqCst), 0, "polled past its claim");
}

/// The client goes away (or a deadline outside gives up) while the handler runs: the
/// handler is not cut off between its effect and its answer, which would leave the key
/// free for the retry to make the effect twice. It runs to its end, and the duplicate
/// waiting for it gets the stored answer. (Before, the handler was cancelled, the claim
/// released, and the duplicate ran the handler a second time.)
#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_the_handler_runs_has_its_effect_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (calls2, done2) = (calls.clone(), done.clone());
    let handler = service_fn(move |_req: Served| {
        calls2.fetch_add(1, Ordering::SeqCst);
        let done = done2.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            done.fetch_add(1, Ordering::SeqCst); // the effect
            Ok::<_, std::convert::Infallible>(respond(201, "order #1"))
        }
    });
    let mut svc = IdempotencyLayer::new(100).layer(handler);
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let mut first = task::spawn(svc.call(keyed("k")));
    assert_pending!(first.poll());
    let second = tokio::spawn(svc.clone().oneshot(keyed("k")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(first);
    let res = second.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(res.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(bytes_of(res.into_body()).await, "order #1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        done.load(Ordering::SeqCst),
        1,
        "the dropped request's handler ran to its end"
    );
}

/// A handler that never answers does not keep its task (nor the key) past its claim
/// once its client has gone: it is cancelled when the claim expires, and the next
/// request runs.
#[tokio::test(start_paused = true)]
async fn a_handler_that_never_answers_is_cancelled_when_its_claim_expires() {
    /// Counts the handler futures dropped.
    struct Dropped(Arc<AtomicUsize>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (dropped2, calls2) = (dropped.clone(), calls.clone());
    let handler = service_fn(move |_req: Served| {
        let n = calls2.fetch_add(1, Ordering::SeqCst);
        let guard = Dropped(dropped2.clone());
        async move {
            let _guard = guard;
            if n == 0 {
                std::future::pending::<()>().await;
            }
            Ok::<_, std::convert::Infallible>(respond(201, "order"))
        }
    });
    let mut svc = IdempotencyLayer::new(100)
        .lock_for(Duration::from_secs(5))
        .unwrap()
        .layer(handler);
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let mut first = task::spawn(svc.call(keyed("k")));
    assert_pending!(first.poll());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    drop(first);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        0,
        "cancelled before its claim expired"
    );
    // The claim expires 5 s after it was taken: from then on a duplicate may run, so
    // the first must not still run (it did until 5 s after the client left).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "still running past its claim"
    );
    let res = svc.oneshot(keyed("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(!res.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A handler that panics under a claimed key: the panic reaches the caller (as it
/// would without the layer), and the key is given back, so the retry runs the handler
/// instead of waiting out the claim or being answered from a store that holds nothing.
#[tokio::test(start_paused = true)]
async fn a_handler_that_panics_gives_its_key_back() {
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let handler = service_fn(move |_req: Served| {
        let n = calls2.fetch_add(1, Ordering::SeqCst);
        async move {
            assert!(n > 0, "the handler panics");
            Ok::<_, std::convert::Infallible>(respond(201, "order"))
        }
    });
    let svc = IdempotencyLayer::new(100)
        .lock_for(Duration::from_secs(60))
        .unwrap()
        .layer(handler);
    let panicked = tokio::spawn(svc.clone().oneshot(keyed("k"))).await;
    assert!(panicked.unwrap_err().is_panic());
    let started = tokio::time::Instant::now();
    let res = svc.oneshot(keyed("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(!res.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "waited out the claim"
    );
}

/// A service that is not ready until a shared instant (a full bulkhead inside).
struct Gated<S> {
    inner: S,
    closed_until: Arc<Mutex<tokio::time::Instant>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: Clone> Clone for Gated<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            closed_until: self.closed_until.clone(),
            sleep: None,
        }
    }
}

impl<S: Service<Req>, Req> Service<Req> for Gated<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        loop {
            let until = *self.closed_until.lock().unwrap();
            if tokio::time::Instant::now() >= until {
                self.sleep = None;
                return self.inner.poll_ready(cx);
            }
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if sleep.deadline() != until {
                sleep.as_mut().reset(until);
            }
            std::task::ready!(sleep.as_mut().poll(cx));
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.inner.call(req)
    }
}

/// A duplicate that waited and then took the key over gives it back when its service
/// is not ready before the claim ends: past the claim another duplicate may take the
/// key, and both would run the handler. (It waited for readiness without bound.)
#[tokio::test(start_paused = true)]
async fn a_duplicate_whose_service_stays_unready_gives_the_key_back_at_claim_end() {
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let handler = service_fn(move |_req: Served| {
        let n = calls2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // The first answer is not remembered, so the waiting duplicate runs.
            Ok::<_, std::convert::Infallible>(respond(if n == 0 { 503 } else { 201 }, "x"))
        }
    });
    let closed_until = Arc::new(Mutex::new(tokio::time::Instant::now()));
    let gated = Gated {
        inner: handler,
        closed_until: closed_until.clone(),
        sleep: None,
    };
    let svc = IdempotencyLayer::new(100)
        .lock_for(Duration::from_secs(5))
        .unwrap()
        .layer(gated);
    let first = tokio::spawn(svc.clone().oneshot(keyed("k")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let duplicate = tokio::spawn(svc.clone().oneshot(keyed("k")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Now every service clone stays unready for a long time.
    *closed_until.lock().unwrap() = tokio::time::Instant::now() + Duration::from_secs(100);
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    // The duplicate took the key at ~1 s; its claim ends 5 s later.
    tokio::time::sleep(Duration::from_millis(5900)).await;
    assert!(duplicate.is_finished(), "still waiting past its claim");
    let duplicate = duplicate.await.unwrap().unwrap();
    assert_eq!(duplicate.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(duplicate.headers()[http::header::RETRY_AFTER], "1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The key is free again: once the service is ready, a retry runs the handler.
    *closed_until.lock().unwrap() = tokio::time::Instant::now();
    let res = svc.oneshot(keyed("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(!res.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A duplicate that took the key over and then waited for its service renews the claim
/// once ready: its handler gets the whole `lock_for` from its start. (The wait used up
/// part of the claim; its client gone before the first renewal, the handler was cut
/// off at the old claim end, and the retry ran it again.)
#[tokio::test(start_paused = true)]
async fn a_duplicate_that_waited_for_its_service_renews_its_claim_once_ready() {
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let handler = service_fn(move |_req: Served| {
        let n = calls2.fetch_add(1, Ordering::SeqCst);
        async move {
            // The first fails fast (not remembered); the next takes 45 s.
            if n == 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Ok::<_, std::convert::Infallible>(respond(500, "x"));
            }
            tokio::time::sleep(Duration::from_secs(45)).await;
            Ok(respond(201, "order #1"))
        }
    });
    let closed_until = Arc::new(Mutex::new(tokio::time::Instant::now()));
    let gated = Gated {
        inner: handler,
        closed_until: closed_until.clone(),
        sleep: None,
    };
    let svc = IdempotencyLayer::new(100)
        .lock_for(Duration::from_secs(60))
        .unwrap()
        .layer(gated);
    let first = tokio::spawn(svc.clone().oneshot(keyed("k")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let duplicate = tokio::spawn(svc.clone().oneshot(keyed("k")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Unready until t = 21 s: the duplicate takes the key over at ~1 s and waits.
    *closed_until.lock().unwrap() = tokio::time::Instant::now() + Duration::from_secs(21);
    assert_eq!(first.await.unwrap().unwrap().status(), 500);
    tokio::time::sleep(Duration::from_secs(29)).await;
    // Its client leaves at ~30 s, before any renewal.
    duplicate.abort();
    // The handler (started at ~21 s) ends at ~66 s, past the old claim end (~61 s).
    tokio::time::sleep(Duration::from_secs(40)).await;
    let retry = svc.oneshot(keyed("k")).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(retry.headers().contains_key(REPLAYED_HEADER), "ran again");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// With `scope_by(authorization)`, two callers who send the same key and request get
/// their own answers (the second used to get the first's response); the same caller's
/// repeat is still answered from the store.
#[tokio::test(start_paused = true)]
async fn keys_scoped_by_the_caller_keep_two_callers_apart() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100)
        .scope_by(http::header::AUTHORIZATION)
        .layer(echo_handler(calls.clone()));
    let as_user = |token: &str| {
        let mut req = keyed("order-7");
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, token.parse().unwrap());
        req
    };
    for token in ["Bearer alice", "Bearer bob"] {
        let res = svc.clone().oneshot(as_user(token)).await.unwrap();
        assert!(!res.headers().contains_key(REPLAYED_HEADER), "{token}");
    }
    let res = svc.clone().oneshot(as_user("Bearer alice")).await.unwrap();
    assert!(res.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Every value of a repeated scope header counts: over HTTP/2 a browser sends each
/// cookie as a field of its own, and two users whose first cookie is the same
/// (`lang=en`) are still two scopes. The same cookies in one field are the same scope.
/// (Only the first value counted: the second user got the first's stored answer.)
#[tokio::test(start_paused = true)]
async fn every_value_of_a_repeated_scope_header_counts() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100)
        .scope_by(http::header::COOKIE)
        .layer(echo_handler(calls.clone()));
    let with_cookies = |cookies: &[&str]| {
        let mut req = keyed("order-7");
        for c in cookies {
            req.headers_mut()
                .append(http::header::COOKIE, c.parse().unwrap());
        }
        req
    };
    for sid in ["sid=A", "sid=B"] {
        let res = svc
            .clone()
            .oneshot(with_cookies(&["lang=en", sid]))
            .await
            .unwrap();
        assert!(!res.headers().contains_key(REPLAYED_HEADER), "{sid}");
    }
    let res = svc
        .clone()
        .oneshot(with_cookies(&["lang=en; sid=A"]))
        .await
        .unwrap();
    assert!(
        res.headers().contains_key(REPLAYED_HEADER),
        "one field or two"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Scoped by two headers (`scope_by` given twice), the same caller acting for two
/// accounts gets an answer per account; the repeat for one account is answered from
/// the store.
#[tokio::test(start_paused = true)]
async fn keys_scoped_by_two_headers_keep_a_callers_accounts_apart() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100)
        .scope_by(http::header::AUTHORIZATION)
        .scope_by(http::HeaderName::from_static("x-account"))
        .layer(echo_handler(calls.clone()));
    let as_user_for = |token: &str, account: &str| {
        let mut req = keyed("order-7");
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, token.parse().unwrap());
        req.headers_mut()
            .insert("x-account", account.parse().unwrap());
        req
    };
    // Both headers count: another account of the same caller, or another caller of
    // the same account, is another scope.
    for (token, account) in [
        ("Bearer alice", "acme"),
        ("Bearer alice", "globex"),
        ("Bearer bob", "acme"),
    ] {
        let res = svc
            .clone()
            .oneshot(as_user_for(token, account))
            .await
            .unwrap();
        assert!(
            !res.headers().contains_key(REPLAYED_HEADER),
            "{token} {account}"
        );
    }
    let res = svc
        .clone()
        .oneshot(as_user_for("Bearer alice", "acme"))
        .await
        .unwrap();
    assert!(res.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// A body that sends one frame, then fails (a request whose client went away
/// mid-upload) or stays open (an event stream, a server stream waiting for more).
struct OneFrameThen {
    frame: Option<&'static [u8]>,
    fails: bool,
}

impl http_body::Body for OneFrameThen {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        match self.frame.take() {
            Some(bytes) => Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(bytes))))),
            None if self.fails => Poll::Ready(Some(Err("connection reset".into()))),
            None => Poll::Pending,
        }
    }
}

/// An upload that fails one frame in.
fn broken_upload() -> OneFrameThen {
    OneFrameThen {
        frame: Some(b"{\"sku\":"),
        fails: true,
    }
}

/// A `POST /orders` with the idempotency key `k` and `body`.
fn keyed_body<B>(body: B) -> Request<B> {
    let mut req = Request::post("http://shop.test/orders").body(body).unwrap();
    req.headers_mut()
        .insert(IDEMPOTENCY_KEY_HEADER, "k".parse().unwrap());
    req
}

/// The answer to a request whose body failed to arrive (a `400` from a handler that
/// could not read it) is not remembered: the request never arrived whole, and its
/// retry, sent whole, runs the handler.
#[tokio::test(start_paused = true)]
async fn the_answer_to_a_request_whose_body_failed_is_not_remembered() {
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let handler = service_fn(move |req: Request<FingerprintedBody<OneFrameThen>>| {
        calls2.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, std::convert::Infallible>(match req.into_body().collect().await {
                Ok(_) => respond(201, "order"),
                Err(_) => respond(400, "body unreadable"),
            })
        }
    });
    let svc = IdempotencyLayer::new(100).layer(handler);
    let upload = || keyed_body(broken_upload());
    let res = svc.clone().oneshot(upload()).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = svc.oneshot(upload()).await.unwrap();
    assert!(
        !res.headers().contains_key(REPLAYED_HEADER),
        "the 400 was remembered"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A response body that reads the request body to its end first (a handler that
/// answers at once and takes the upload in while it streams its answer), then says
/// `accepted` whether the upload arrived or failed.
struct DrainThenAnswer<B>(Option<B>);

impl<B: http_body::Body + Unpin> http_body::Body for DrainThenAnswer<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        while let Some(upload) = self.0.as_mut() {
            match Pin::new(upload).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(_)) | None) => {
                    self.0 = None;
                    return Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                        b"accepted",
                    )))));
                }
            }
        }
        Poll::Ready(None)
    }
}

/// A request body that fails only after the handler has answered (read while its
/// answer streams) leaves no fingerprint: that answer is not remembered. (It was
/// stored without one, and then replayed to any request with the key, whatever its
/// body: a different order got this one's answer instead of a `422`.)
#[tokio::test(start_paused = true)]
async fn a_request_body_failing_after_the_answer_is_not_remembered() {
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let handler = service_fn(move |req: Request<FingerprintedBody<OneFrameThen>>| {
        calls2.fetch_add(1, Ordering::SeqCst);
        let mut res = Response::new(DrainThenAnswer(Some(req.into_body())));
        *res.status_mut() = StatusCode::CREATED;
        async move { Ok::<_, std::convert::Infallible>(res) }
    });
    let svc = IdempotencyLayer::new(100).layer(handler);
    let upload = || keyed_body(broken_upload());
    let res = svc.clone().oneshot(upload()).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(bytes_of(res.into_body()).await, "accepted");
    let res = svc.oneshot(upload()).await.unwrap();
    assert!(
        !res.headers().contains_key(REPLAYED_HEADER),
        "the answer to a request that never arrived whole was remembered"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A replayed answer carries the first answer's end-to-end headers, not its hop-by-hop
/// ones (`transfer-encoding`, `connection` and what it names): they described the
/// first answer's connection, and a replay sends the body whole.
#[tokio::test(start_paused = true)]
async fn a_replayed_answer_has_no_hop_by_hop_headers() {
    let handler = service_fn(|_req: Served| async {
        let mut res = respond(201, "order");
        let h = res.headers_mut();
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("connection", "keep-alive, x-conn-id".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-conn-id", "7".parse().unwrap());
        h.insert("x-order", "42".parse().unwrap());
        // End to end (RFC 9110 §6.6.2): hyper sends HTTP/1.1 trailers only when named.
        h.insert("trailer", "x-checksum".parse().unwrap());
        Ok::<_, std::convert::Infallible>(res)
    });
    let svc = IdempotencyLayer::new(100).layer(handler);
    svc.clone().oneshot(keyed("k")).await.unwrap();
    let again = svc.oneshot(keyed("k")).await.unwrap();
    assert!(again.headers().contains_key(REPLAYED_HEADER));
    let mut names: Vec<_> = again.headers().keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    let mut want = [REPLAYED_HEADER, "trailer", "x-order"];
    want.sort_unstable();
    assert_eq!(names, want);
}

/// A repeat whose body cannot be read (its client went away mid-upload) cannot be
/// compared with the first request: it is answered `400` with a problem document, not
/// with the stored answer, nor by running the handler; a whole repeat is still
/// replayed.
#[tokio::test(start_paused = true)]
async fn a_repeat_whose_body_cannot_be_read_is_answered_400() {
    use http_body_util::combinators::BoxBody;
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let handler = service_fn(
        move |req: Request<FingerprintedBody<BoxBody<Bytes, BoxError>>>| {
            calls2.fetch_add(1, Ordering::SeqCst);
            async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let mut res = Response::new(Full::new(body));
                *res.status_mut() = StatusCode::CREATED;
                Ok::<_, std::convert::Infallible>(res)
            }
        },
    );
    let svc = IdempotencyLayer::new(100).layer(handler);
    let with_key = keyed_body::<BoxBody<Bytes, BoxError>>;
    let whole = || {
        Full::new(Bytes::from_static(b"{\"sku\":1}"))
            .map_err(BoxError::from)
            .boxed()
    };
    let first = svc.clone().oneshot(with_key(whole())).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let broken = svc
        .clone()
        .oneshot(with_key(broken_upload().boxed()))
        .await
        .unwrap();
    assert_eq!(broken.status(), StatusCode::BAD_REQUEST);
    assert_eq!(broken.headers()["content-type"], "application/problem+json");
    assert!(!broken.headers().contains_key(REPLAYED_HEADER));
    let doc = bytes_of(broken.into_body()).await;
    assert!(
        String::from_utf8_lossy(&doc).contains("Request body unreadable"),
        "{doc:?}"
    );
    let again = svc.oneshot(with_key(whole())).await.unwrap();
    assert!(again.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(bytes_of(again.into_body()).await, r#"{"sku":1}"#);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A handler answering `content_type` with a stream that stays open after one message.
fn open_stream_handler(
    calls: Arc<AtomicUsize>,
    content_type: &'static str,
) -> impl Service<
    Served,
    Response = Response<OneFrameThen>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |_req: Served| {
        calls.fetch_add(1, Ordering::SeqCst);
        let mut res = Response::new(OneFrameThen {
            frame: Some(b"data: 1\n\n"),
            fails: false,
        });
        res.headers_mut()
            .insert("content-type", content_type.parse().unwrap());
        async move { Ok(res) }
    })
}

/// Its first message reaches the client while the stream stays open, within `wait`.
async fn first_message_within(res: Response<impl http_body::Body<Data = Bytes>>, wait: Duration) {
    let mut body = std::pin::pin!(res.into_body());
    let frame = tokio::time::timeout(wait, body.frame())
        .await
        .expect("the first message was held back")
        .expect("a frame")
        .ok()
        .expect("data");
    assert_eq!(frame.into_data().ok().unwrap(), "data: 1\n\n");
}

/// Server-sent events with a key are streamed, not read to their end to be remembered:
/// no event reached the client while the stream was open (until the claim ended).
#[tokio::test(start_paused = true)]
async fn an_event_stream_with_a_key_is_streamed_not_remembered() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc =
        IdempotencyLayer::new(100).layer(open_stream_handler(calls.clone(), "text/event-stream"));
    let res = tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(keyed("k")))
        .await
        .expect("the answer was held back")
        .unwrap();
    first_message_within(res, Duration::from_secs(1)).await;
    let again = svc.oneshot(keyed("k")).await.unwrap();
    assert!(!again.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A response its handler marks with `StreamThrough` (an NDJSON progress stream) is
/// streamed, not read to its end to be remembered: without the mark its first line
/// was held back until the stream ended. A repeat runs the handler again.
#[tokio::test(start_paused = true)]
async fn a_response_marked_stream_through_is_streamed_not_remembered() {
    let calls = Arc::new(AtomicUsize::new(0));
    let ndjson = open_stream_handler(calls.clone(), "application/x-ndjson").map_response(
        |mut res: Response<OneFrameThen>| {
            res.extensions_mut().insert(StreamThrough);
            res
        },
    );
    let svc = IdempotencyLayer::new(100).layer(ndjson);
    let res = tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(keyed("k")))
        .await
        .expect("the answer was held back")
        .unwrap();
    first_message_within(res, Duration::from_secs(1)).await;
    let again = svc.clone().oneshot(keyed("k")).await.unwrap();
    assert!(!again.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Unmarked, the same stream is read to be remembered: nothing reaches the client.
    let unmarked = IdempotencyLayer::new(100)
        .layer(open_stream_handler(calls.clone(), "application/x-ndjson"));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), unmarked.oneshot(keyed("k")))
            .await
            .is_err()
    );
}

/// A gRPC method named in `stream_through` passes through as if it had no key: its
/// server stream reaches the client as it is sent (a bidirectional call waiting for
/// an answer hung until its deadline), and it is never replayed.
#[tokio::test(start_paused = true)]
async fn a_stream_through_method_with_a_key_passes_through() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(100)
        .stream_through("/chat.Chat/Talk")
        .unwrap()
        .layer(open_stream_handler(calls.clone(), "application/grpc"));
    let call = || keyed_with("k", "http://chat.test/chat.Chat/Talk", "msg");
    let res = tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(call()))
        .await
        .expect("the answer was held back")
        .unwrap();
    first_message_within(res, Duration::from_secs(1)).await;
    let again = svc.clone().oneshot(call()).await.unwrap();
    assert!(!again.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Another method is not named: its answer is read to be remembered.
    let other = svc.oneshot(keyed_with("k", "http://chat.test/chat.Chat/Send", "m"));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), other)
            .await
            .is_err(),
        "not named: held until the stream ends"
    );
}

// === typed flavour: never-cases ===

#[tokio::test(start_paused = true)]
async fn typed_flavour_keeps_policy_requests_synchronous_and_passes_permanent_errors() {
    let queue = Arc::new(MemoryQueue::new());
    let refuse = service_fn(|_cmd: Command| async {
        Err::<u32, BoxError>(boxed(Open::new(Duration::from_secs(1))))
    });
    let config = EnqueueConfig::new().policy(DeferPolicy::new().keep_sync_method("RUN"));
    let svc = DeferLayer::with_config(queue.clone(), CommandCodec, config)
        .unwrap()
        .layer(refuse);
    let cmd = Command {
        key: None,
        text: "x".into(),
    };
    let err = svc.oneshot(cmd.clone()).await.unwrap_err();
    assert!(find_cause::<Open>(&*err).is_some());

    // A body over `max_body` is not stored either.
    let config = EnqueueConfig::new().max_body(4);
    let svc = DeferLayer::with_config(queue.clone(), CommandCodec, config)
        .unwrap()
        .layer(refuse);
    let long = Command {
        key: None,
        text: "longer than four bytes".into(),
    };
    let err = svc.oneshot(long).await.unwrap_err();
    assert!(find_cause::<Open>(&*err).is_some());
    assert_eq!(depth(&queue).await, Depth::default());

    // A permanent failure (one the classifier says is not worth a retry: a rejected
    // argument) is returned as it is, not stored.
    #[derive(Debug)]
    struct Rejected;
    impl std::fmt::Display for Rejected {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("invalid argument")
        }
    }
    impl std::error::Error for Rejected {}
    let invalid = service_fn(|_cmd: Command| async { Err::<u32, BoxError>(boxed(Rejected)) });
    let permanent = |outcome: Result<&u32, &BoxError>| match outcome {
        Err(e) if e.is::<Rejected>() => {
            postbox::classify::Classification::failure().with_retryable(false)
        }
        Err(e) => postbox::classify::classify_error(&**e),
        Ok(_) => postbox::classify::Classification::success(),
    };
    let svc = DeferLayer::new(queue.clone(), CommandCodec)
        .with_classifier(permanent)
        .layer(invalid);
    let err = svc.oneshot(cmd.clone()).await.unwrap_err();
    assert!(err.is::<Rejected>(), "{err}");
    assert_eq!(depth(&queue).await, Depth::default());

    let late = service_fn(|_cmd: Command| async { Ok::<u32, BoxError>(3) });
    let svc = DeferLayer::new(queue.clone(), CommandCodec).layer(late);
    assert_eq!(svc.oneshot(cmd).await.unwrap(), Deferred::Completed(3));
    assert_eq!(depth(&queue).await, Depth::default());
}

#[tokio::test(start_paused = true)]
async fn typed_flavour_answers_a_full_queue_with_not_enqueued_carrying_both_failures() {
    let queue = Arc::new(MemoryQueue::with_capacity(0));
    let refuse = service_fn(|_cmd: Command| async {
        Err::<u32, BoxError>(boxed(Open::new(Duration::from_secs(1))))
    });
    let svc = DeferLayer::new(queue.clone(), CommandCodec).layer(refuse);
    let cmd = Command {
        key: None,
        text: "x".into(),
    };
    let err = svc.oneshot(cmd).await.unwrap_err();
    let not = err.downcast_ref::<NotEnqueued>().expect("NotEnqueued");
    assert!(matches!(
        not.queue_error(),
        QueueError::Full { capacity: 0 }
    ));
    assert_eq!(not.reason(), DeferReason::CircuitOpen);
    assert!(find_cause::<Open>(&*err).is_some());
}

#[tokio::test(start_paused = true)]
async fn typed_flavour_never_enqueues_a_call_its_caller_dropped() {
    let queue = Arc::new(MemoryQueue::new());
    let entered = Arc::new(AtomicUsize::new(0));
    let entered2 = entered.clone();
    // Fails, but only after the caller has gone.
    let slow = service_fn(move |_cmd: Command| {
        entered2.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Err::<u32, BoxError>(boxed(Open::new(Duration::from_secs(1))))
        }
    });
    let svc = DeferLayer::new(queue.clone(), CommandCodec).layer(slow);
    let cmd = Command {
        key: None,
        text: "x".into(),
    };
    let call = svc.oneshot(cmd);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), call)
            .await
            .is_err()
    );
    assert_eq!(entered.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(depth(&queue).await, Depth::default());
}

// === with the durable embedded queue ===

#[cfg(feature = "embedded")]
#[tokio::test]
async fn deferred_requests_survive_a_reopen_of_the_embedded_queue_and_are_replayed() {
    use postbox::queue::{EmbeddedOptions, EmbeddedQueue};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postbox.redb");
    let mut ids = Vec::new();
    {
        let queue = Arc::new(EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap());
        let down = Dependency::default();
        let client = EnqueueFallbackLayer::new(queue.clone())
            .layer(down.service(|| Err(boxed(BulkheadFull::new(1, 0)))));
        for _ in 0..3 {
            let res = client
                .clone()
                .oneshot(post("http://shop.test/orders", "{}"))
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::ACCEPTED);
            ids.push(receipt_id(&res));
        }
        queue.close().await.unwrap();
    }
    let queue = Arc::new(EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap());
    assert_eq!(queue.depth().await.unwrap().pending, 3);
    let server = OrderServer::default();
    let handle = Replayer::http(queue.clone(), server.service())
        .poll_interval(Duration::from_millis(10))
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while handle.stats().replayed < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("replayed within 20 s");
    handle.shutdown().await;
    assert_eq!(server.handled.load(Ordering::SeqCst), 3);
    assert_eq!(queue.depth().await.unwrap(), Depth::default());
}

// === axum ===

#[tokio::test(start_paused = true)]
async fn idempotency_layer_drops_into_an_axum_router() {
    use axum::Router;
    use axum::routing::post as post_route;

    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new()
        .route(
            "/orders",
            post_route(move || {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                async move { (StatusCode::CREATED, format!("order #{n}")) }
            }),
        )
        .layer(IdempotencyLayer::new(100));
    let request = || {
        Request::post("/orders")
            .header(IDEMPOTENCY_KEY_HEADER, "abc")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let first = app.clone().oneshot(request()).await.unwrap();
    let second = app.oneshot(request()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(second.status(), StatusCode::CREATED);
    assert_eq!(second.headers()[REPLAYED_HEADER], "true");
    assert_eq!(bytes_of(first.into_body()).await, "order #1");
    assert_eq!(bytes_of(second.into_body()).await, "order #1");
}

#[tokio::test(start_paused = true)]
async fn enqueue_fallback_answers_202_in_front_of_an_axum_body_stack() {
    let queue = Arc::new(MemoryQueue::new());
    let inner = service_fn(|_req: Request<BufferedBody<axum::body::Body>>| async {
        Err::<Response<axum::body::Body>, BoxError>(boxed(Open::new(Duration::from_secs(1))))
    });
    let svc = EnqueueFallbackLayer::new(queue.clone()).layer(inner);
    let req = Request::post("http://api.test/orders")
        .body(axum::body::Body::from("{}"))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(queue.get(receipt_id(&res)).unwrap().body, "{}");
}

fn receipt_id<B>(res: &Response<B>) -> MessageId {
    res.extensions()
        .get::<Receipt>()
        .expect("receipt extension")
        .id()
}

#[tokio::test(start_paused = true)]
async fn a_retried_call_with_the_same_key_is_stored_once() {
    let queue = Arc::new(MemoryQueue::new());
    let dep = Dependency::default();
    let svc = EnqueueFallbackLayer::new(queue.clone())
        .layer(dep.service(|| Err(boxed(Open::new(Duration::from_secs(1))))));
    let call = || {
        let mut req = post("http://api.test/orders", "{}");
        req.headers_mut()
            .insert(IDEMPOTENCY_KEY_HEADER, "same".parse().unwrap());
        svc.clone().oneshot(req)
    };
    let first = call().await.unwrap();
    let second = call().await.unwrap();
    assert_eq!(receipt_id(&first), receipt_id(&second));
    let receipt = second.extensions().get::<Receipt>().unwrap();
    assert!(receipt.is_duplicate());
    assert_eq!(second.headers()[postbox::enqueue::DUPLICATE_HEADER], "true");
    assert!(
        !first
            .headers()
            .contains_key(postbox::enqueue::DUPLICATE_HEADER)
    );
    assert_eq!(depth(&queue).await.pending, 1);
}

#[tokio::test(start_paused = true)]
async fn futures_are_send_and_run_on_spawned_tasks() {
    let queue = Arc::new(MemoryQueue::new());
    let dep = Dependency::default();
    let svc = EnqueueFallbackLayer::new(queue.clone())
        .layer(dep.service(|| Err(boxed(BulkheadFull::new(1, 0)))));
    let res = tokio::spawn(svc.oneshot(post("http://api.test/orders", "{}")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);

    let typed = DeferLayer::new(queue.clone(), CommandCodec)
        .layer(service_fn(|_c: Command| async { Ok::<u32, BoxError>(1) }));
    let cmd = Command {
        key: None,
        text: "x".into(),
    };
    let out = tokio::spawn(typed.oneshot(cmd)).await.unwrap().unwrap();
    assert_eq!(out, Deferred::Completed(1));
}

// === metrics ===

/// Enqueued, enqueue failures, replayed, dead-lettered and the queue's depth are
/// distinct metrics, each counting its own events once.
#[tokio::test(start_paused = true)] // current-thread: the local recorder sees every task
async fn enqueue_and_replay_report_distinct_metrics() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let open = || Err(boxed(Open::new(Duration::from_secs(5))));
    // Deferred once into a queue with room, refused once by a full queue.
    let queue = Arc::new(MemoryQueue::new());
    assert_eq!(
        defer_with(&queue, open).await.0.unwrap().status(),
        StatusCode::ACCEPTED
    );
    let full = Arc::new(MemoryQueue::with_capacity(0));
    assert!(defer_with(&full, open).await.0.is_err());
    // Replayed: the deferred message is delivered, another is refused for good (422).
    enqueue_raw(&queue, "http://api.test/refused").await;
    let svc = service_fn(|req: InnerReq| async move {
        let status = if req.uri().path() == "/refused" {
            422
        } else {
            200
        };
        Ok::<_, BoxError>(respond(status, ""))
    });
    let handle_r = Replayer::http(queue.clone(), svc)
        .name("orders")
        .spawn()
        .unwrap();
    eventually(|| {
        let s = handle_r.stats();
        s.replayed == 1 && s.dead_lettered == 1
    })
    .await;
    handle_r.shutdown().await;
    // A second replayer, on another queue, reports into series of its own.
    let other = Arc::new(MemoryQueue::new());
    enqueue_raw(&other, "http://api.test/one").await;
    enqueue_raw(&other, "http://api.test/two").await;
    let svc = service_fn(|_req: InnerReq| async { Ok::<_, BoxError>(respond(200, "")) });
    let handle_p = Replayer::http(other.clone(), svc)
        .name("payments")
        .spawn()
        .unwrap();
    eventually(|| handle_p.stats().replayed == 2).await;
    handle_p.shutdown().await;

    let render = handle.render();
    let enqueue = |outcome: &str| {
        let outcome = format!(r#"outcome="{outcome}""#);
        sample(
            &render,
            "postbox_calls_total",
            &[r#"layer="enqueue""#, &outcome],
        )
    };
    assert_eq!(enqueue("enqueued"), Some(1.0), "{render}");
    assert_eq!(enqueue("enqueue_failed"), Some(1.0), "{render}");
    let orders = r#"queue="orders""#;
    let payments = r#"queue="payments""#;
    assert_eq!(
        sample(&render, "postbox_replayed_total", &[orders]),
        Some(1.0),
        "{render}"
    );
    assert_eq!(
        sample(&render, "postbox_replayed_total", &[payments]),
        Some(2.0),
        "{render}"
    );
    assert_eq!(
        sample(&render, "postbox_dead_lettered_total", &[orders]),
        Some(1.0)
    );
    let depth = |queue: &str, state: &str| {
        let state = format!(r#"state="{state}""#);
        sample(&render, "postbox_queue_depth", &[queue, &state])
    };
    assert_eq!(
        (
            depth(orders, "pending"),
            depth(orders, "in_flight"),
            depth(orders, "dead")
        ),
        (Some(0.0), Some(0.0), Some(1.0)),
        "{render}"
    );
    assert_eq!(depth(payments, "dead"), Some(0.0), "{render}");
}

/// With `require_key`, a request of an unsafe method without a usable key is refused
/// with `400` and a problem document (the IETF draft's answer), before the handler runs;
/// a safe method, a keyed request and a `stream_through` gRPC method pass. gRPC callers
/// get `INVALID_ARGUMENT`.
#[tokio::test]
async fn require_key_refuses_an_unsafe_request_without_a_usable_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = service_fn({
        let calls = calls.clone();
        move |_req: Request<_>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new()))) }
        }
    });
    let svc = IdempotencyLayer::new(100)
        .require_key()
        .stream_through("/chat.Chat/*")
        .unwrap()
        .layer(handler);
    let call = |req: Request<Full<Bytes>>| svc.clone().oneshot(req);

    let res = call(post("http://shop.test/orders", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("Idempotency-Key is missing"),
        "{body:?}"
    );
    let mut blank = post("http://shop.test/orders", "{}");
    blank
        .headers_mut()
        .insert(IDEMPOTENCY_KEY_HEADER, " ".parse().unwrap());
    assert_eq!(call(blank).await.unwrap().status(), StatusCode::BAD_REQUEST);
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler ran");

    let get = Request::get("http://shop.test/orders/7")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(call(get).await.unwrap().status(), StatusCode::OK);
    assert_eq!(call(keyed("k")).await.unwrap().status(), StatusCode::OK);
    let grpc = |path: &str| {
        Request::post(format!("http://shop.test{path}"))
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(
        call(grpc("/chat.Chat/Talk")).await.unwrap().status(),
        StatusCode::OK
    );
    let refused = call(grpc("/shop.Orders/Create")).await.unwrap();
    assert_eq!(refused.headers()["grpc-status"], "3");
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // Off by default: a request without a key runs as if the layer were not there.
    let plain = IdempotencyLayer::new(100).layer(service_fn(|_req: Request<_>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let res = plain
        .oneshot(post("http://shop.test/orders", "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// A request body of data frames, each read on its own.
type Frames = http_body_util::StreamBody<
    tokio_stream::Iter<
        std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::convert::Infallible>>,
    >,
>;

/// A `4xx` a handler answered after reading only part of the body (a body limit's
/// `413`, a parser failing midway) is not remembered: only the head was fingerprinted,
/// so a corrected repeat under the same key got the stale `413` replayed instead of
/// running. An answer after the whole body was read is remembered as before.
#[tokio::test(start_paused = true)]
async fn a_refusal_after_a_partly_read_body_is_not_remembered() {
    let chunked = |parts: &[&'static str]| {
        let frames: Vec<_> = parts
            .iter()
            .map(|p| Ok(http_body::Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        let mut req = Request::post("http://shop.test/orders")
            .body(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
            .unwrap();
        req.headers_mut()
            .insert(IDEMPOTENCY_KEY_HEADER, "k".parse().unwrap());
        req
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    // Refuses a first frame over 4 bytes without reading on (a body limit).
    let limited = service_fn(move |req: Request<FingerprintedBody<Frames>>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut body = req.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            if first.len() > 4 {
                return Ok::<_, std::convert::Infallible>(respond(413, "too large"));
            }
            while body.frame().await.is_some() {}
            Ok(respond(201, "order #1"))
        }
    });
    let svc = IdempotencyLayer::new(100).layer(limited);
    let refused = svc
        .clone()
        .oneshot(chunked(&["too large", "!"]))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let corrected = svc.clone().oneshot(chunked(&["ok", "!"])).await.unwrap();
    assert_eq!(corrected.status(), StatusCode::CREATED);
    assert!(!corrected.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Read whole: remembered, and replayed to a true repeat.
    let again = svc.clone().oneshot(chunked(&["ok", "!"])).await.unwrap();
    assert!(again.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A refusal decided from the body's headers before reading any of it (a body limit's
/// `413` on `Content-Length`, as tower-http's answers) is not remembered either: the
/// fingerprint was of the head alone, which does not hold `Content-Length`, and the
/// corrected repeat got the stale `413` for the whole ttl.
#[tokio::test]
async fn a_refusal_made_before_reading_the_body_is_not_remembered() {
    let post = |body: &'static str| {
        let mut req = Request::post("http://shop.test/orders")
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        req.headers_mut()
            .insert(IDEMPOTENCY_KEY_HEADER, "k".parse().unwrap());
        req
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let limited = service_fn(move |req: Request<FingerprintedBody<Full<Bytes>>>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let too_large = req.headers()[http::header::CONTENT_LENGTH]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > 4;
            if too_large {
                return Ok::<_, std::convert::Infallible>(respond(413, "too large"));
            }
            req.into_body().collect().await.unwrap();
            Ok(respond(201, "order #1"))
        }
    });
    let svc = IdempotencyLayer::new(100).layer(limited);
    let refused = svc.clone().oneshot(post("too large")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let corrected = svc.clone().oneshot(post("ok")).await.unwrap();
    assert_eq!(corrected.status(), StatusCode::CREATED);
    assert!(!corrected.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let again = svc.clone().oneshot(post("ok")).await.unwrap();
    assert!(again.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The same for a gRPC refusal made from the request's head (tonic's "message too
/// large" from the length prefix, an interceptor's `INVALID_ARGUMENT`), a trailers-only
/// answer under `200 OK`: the corrected repeat under the key runs. (Only an HTTP `4xx`
/// was taken for a refusal; the stale error was replayed for the whole ttl.)
#[tokio::test]
async fn a_grpc_refusal_made_before_reading_the_body_is_not_remembered() {
    let call = |body: &'static [u8]| {
        let mut req = Request::post("http://shop.test/shop.Orders/Place")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        req.headers_mut()
            .insert(IDEMPOTENCY_KEY_HEADER, "k".parse().unwrap());
        req
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let limited = service_fn(move |req: Request<FingerprintedBody<Full<Bytes>>>| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let grpc = |status: &str| {
                Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", status)
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            };
            if n == 0 {
                // Refused from the head: the body is never read.
                return Ok::<_, std::convert::Infallible>(grpc("3"));
            }
            req.into_body().collect().await.unwrap();
            Ok(grpc("0"))
        }
    });
    let svc = IdempotencyLayer::new(100).layer(limited);
    let refused = svc
        .clone()
        .oneshot(call(b"\0\0\0\0\x09too large"))
        .await
        .unwrap();
    assert_eq!(refused.headers()["grpc-status"], "3");
    let corrected = svc.clone().oneshot(call(b"\0\0\0\0\x02ok")).await.unwrap();
    assert_eq!(corrected.headers()["grpc-status"], "0");
    assert!(!corrected.headers().contains_key(REPLAYED_HEADER));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
