//! Layers composed in the DESIGN.md order behave as a whole: the retry sees every
//! attempt, the breaker records every attempt, and an open breaker's hint is honoured.

use postbox::BoxError;
use postbox::circuit_breaker::{CircuitBreakerLayer, State};
use postbox::retry::RetryLayer;
use postbox::retry::backoff::Backoff;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, service_fn};

/// An inner service that fails its first `failures` calls with a transport error,
/// recording when each call arrived.
fn flaky(
    failures: usize,
    calls: Arc<Mutex<Vec<Instant>>>,
) -> impl tower::Service<
    u32,
    Response = u32,
    Error = BoxError,
    Future = std::future::Ready<Result<u32, BoxError>>,
> + Clone {
    service_fn(move |x: u32| {
        let mut calls = calls.lock().unwrap();
        calls.push(Instant::now());
        std::future::ready(if calls.len() <= failures {
            Err(io::Error::from(io::ErrorKind::ConnectionReset).into())
        } else {
            Ok(x)
        })
    })
}

#[tokio::test(start_paused = true)]
async fn retry_outside_a_breaker_records_every_attempt_in_the_breaker() {
    let breaker = CircuitBreakerLayer::builder()
        .count_window(100)
        .minimum_calls(4)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let retry = RetryLayer::builder()
        .max_retries(3)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .no_budget()
        .build()
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker)
        .service(flaky(3, calls.clone()));

    assert_eq!(svc.oneshot(7).await.unwrap(), 7);
    assert_eq!(calls.lock().unwrap().len(), 4);
    let m = handle.metrics();
    assert_eq!(m.calls(), 4, "every attempt is recorded, not just the call");
    assert_eq!(m.failures(), 3);
    // 3 failures of 4 calls (the default threshold is 50 %): one outer call that
    // succeeded, counted alone, would have left it closed.
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn an_open_breakers_rejection_is_not_retried_before_its_retry_after() {
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .break_duration(Duration::from_secs(2))
        .permitted_probes(1)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let retry = RetryLayer::builder()
        .max_retries(3)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .no_budget()
        .build()
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker)
        .service(flaky(1, calls.clone()));

    // Attempt 1 fails and opens the breaker; attempt 2 (after 10 ms) is rejected with a
    // hint of ~1.99 s; attempt 3 waits for the hint and is the half-open probe.
    assert_eq!(svc.oneshot(7).await.unwrap(), 7);
    let calls = calls.lock().unwrap();
    assert_eq!(
        calls.len(),
        2,
        "the rejection never reached the inner service"
    );
    let gap = calls[1] - calls[0];
    assert!(
        gap >= Duration::from_secs(2),
        "probe came {gap:?} after the failure: too early"
    );
    assert!(
        gap < Duration::from_millis(2100),
        "probe waited {gap:?}: far beyond the hint"
    );
    assert_eq!(handle.state(), State::Closed);
}

/// A break that ends after `max_open_wait` is not waited for: the caller gets the
/// breaker's rejection at once (fails fast, or is deferred by a fallback outside)
/// instead of being held for the break, the pile-up the breaker is there to stop.
#[tokio::test(start_paused = true)]
async fn a_break_longer_than_max_open_wait_returns_the_rejection_at_once() {
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .break_duration(Duration::from_secs(2))
        .build()
        .unwrap();
    let retry = RetryLayer::builder()
        .max_retries(3)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .max_open_wait(Duration::from_secs(1))
        .no_budget()
        .build()
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker)
        .service(flaky(1, calls.clone()));
    let start = Instant::now();
    let err = svc.oneshot(7).await.unwrap_err();
    let open = err.open().expect("the breaker's rejection");
    assert!(open.retry_after() > Duration::from_secs(1), "{open:?}");
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(10),
        "one backoff, then the rejection"
    );
    assert_eq!(calls.lock().unwrap().len(), 1);
}

/// A breaker forced open by hand has no end to wait for: the retry returns its
/// rejection at once, not after waiting its `retry_after` (the break duration) once
/// per retry, as it did.
#[tokio::test(start_paused = true)]
async fn a_breaker_forced_open_is_not_waited_for() {
    let breaker = CircuitBreakerLayer::builder()
        .break_duration(Duration::from_secs(2))
        .build()
        .unwrap();
    breaker.handle().force_open();
    let retry = RetryLayer::builder()
        .max_retries(3)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .no_budget()
        .build()
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker)
        .service(flaky(0, calls.clone()));
    let start = Instant::now();
    let err = svc.oneshot(7).await.unwrap_err();
    let open = err.open().expect("the breaker's rejection");
    assert!(open.is_forced(), "{open:?}");
    assert_eq!(open.retry_after(), Duration::from_secs(2));
    assert_eq!(start.elapsed(), Duration::ZERO, "not waited for");
    assert!(calls.lock().unwrap().is_empty());
}

/// Up to three retries 10 ms apart, from a budget that never has one to give.
fn retry_with_a_spent_budget() -> RetryLayer<postbox::retry::DefaultPolicy> {
    let budget = postbox::retry::RetryBudget::builder()
        .ratio(0.0)
        .min_retries_per_sec(0)
        .build()
        .unwrap();
    RetryLayer::builder()
        .max_retries(3)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .budget(budget)
        .build()
        .unwrap()
}

/// A retry after an open breaker's rejection takes nothing from the retry budget: the
/// rejected attempt never reached the dependency. With a spent budget, a caller that met an open
/// breaker still waits for the break and is its probe, instead of failing for want of
/// a retry that adds no load.
#[tokio::test(start_paused = true)]
async fn a_retry_after_an_open_breakers_rejection_takes_nothing_from_the_budget() {
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .break_duration(Duration::from_secs(2))
        .permitted_probes(1)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let retry = retry_with_a_spent_budget();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new()
        .layer(retry)
        .layer(breaker)
        .service(flaky(1, calls.clone()));
    // The failure opens the breaker and is not retried: the budget is spent.
    assert!(svc.clone().oneshot(7).await.unwrap_err().open().is_none());
    assert_eq!(handle.state(), State::Open);
    // The next call is rejected, waits out the break without the budget, and probes.
    assert_eq!(svc.oneshot(8).await.unwrap(), 8);
    assert_eq!(calls.lock().unwrap().len(), 2);
    assert_eq!(handle.state(), State::Closed);
}

/// A full bulkhead's rejection is still charged to the budget (only an open breaker's
/// is not): retried without a hint under overload, its callers would pile up on the
/// backoff. With the budget spent, the rejection comes back at once.
#[tokio::test(start_paused = true)]
async fn a_retry_after_a_full_bulkhead_is_charged_to_the_budget() {
    let bulkhead = postbox::bulkhead::BulkheadLayer::new(1).unwrap();
    let retry = retry_with_a_spent_budget();
    let (release, hold) = tokio::sync::oneshot::channel::<()>();
    let hold = Arc::new(tokio::sync::Mutex::new(Some(hold)));
    let svc = ServiceBuilder::new()
        .layer(retry)
        .layer(bulkhead)
        .service(service_fn(move |x: u32| {
            let hold = hold.clone();
            async move {
                if let Some(rx) = hold.lock().await.take() {
                    let _ = rx.await;
                }
                Ok::<_, BoxError>(x)
            }
        }));
    let first = tokio::spawn(svc.clone().oneshot(1));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let start = Instant::now();
    let err = svc.oneshot(2).await.unwrap_err();
    assert!(
        postbox::error::find_cause::<postbox::bulkhead::error::Full>(&*err).is_some(),
        "{err}"
    );
    assert_eq!(start.elapsed(), Duration::ZERO, "not retried");
    let _ = release.send(());
    assert_eq!(first.await.unwrap().unwrap(), 1);
}

#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn a_retry_inside_the_enqueue_fallback_replays_the_buffered_body() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use postbox::enqueue::{BufferedBody, EnqueueFallbackLayer};
    use postbox::queue::MemoryQueue;

    let bodies = Arc::new(Mutex::new(Vec::<Bytes>::new()));
    let inner = service_fn({
        let bodies = bodies.clone();
        move |req: http::Request<BufferedBody<Full<Bytes>>>| {
            let bodies = bodies.clone();
            async move {
                let body = req.into_body().collect().await?.to_bytes();
                let n = {
                    let mut seen = bodies.lock().unwrap();
                    seen.push(body);
                    seen.len()
                };
                let status = if n < 3 { 503 } else { 200 };
                Ok::<_, BoxError>(
                    http::Response::builder()
                        .status(status)
                        .body(Full::<Bytes>::default())?,
                )
            }
        }
    });
    let retry = RetryLayer::http()
        .max_retries(3)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .no_budget()
        .build()
        .unwrap();
    let queue = Arc::new(MemoryQueue::new());
    let svc = ServiceBuilder::new()
        .layer(EnqueueFallbackLayer::new(queue.clone()))
        .layer(retry)
        .service(inner);

    // A POST without a key: the fallback adds one, which makes it retry-safe.
    let req = http::Request::post("http://orders.test/orders")
        .body(Full::new(Bytes::from_static(b"{\"sku\":42}")))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 3);
    assert!(
        bodies
            .iter()
            .all(|b| b == &Bytes::from_static(b"{\"sku\":42}"))
    );
    use postbox::queue::Queue;
    assert_eq!(
        queue.depth().await.unwrap().pending,
        0,
        "a call that recovered is not deferred"
    );
}
