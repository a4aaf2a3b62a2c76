//! The retry layer, driven through `tower_test` mocks with paused time.
//!
//! Requests are only ever taken with `Handle::poll_request` (never awaited): an idle
//! paused runtime advances its clock to the next timer by itself, which would hide an
//! early or late retry.
#![cfg(feature = "http")]

#[path = "../support/mod.rs"]
mod shared;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header::RETRY_AFTER};
use http_body_util::{BodyExt, Full};
use postbox::BoxError;
use postbox::circuit_breaker::error::Open;
use postbox::classify::{Classification, ErrorClassifier};
use postbox::http::body::{BodyNotReplayable, BufferBodyLayer, ReplayBody};
use postbox::http::idempotency_key::IDEMPOTENCY_KEY;
use postbox::retry::backoff::{Backoff, Jitter};
use postbox::retry::{HttpRequests, JitterRng, RetryBudget, RetryEvent, RetryLayer};
use proptest::prelude::*;
use std::io;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::time::advance;
use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok, task};
use tower::{Layer, ServiceBuilder};
use tower_test::mock::{self, Handle, SendResponse};

const MS: Duration = Duration::from_millis(1);

fn reset() -> BoxError {
    io::Error::new(io::ErrorKind::ConnectionReset, "reset").into()
}

fn refused() -> BoxError {
    io::Error::from(io::ErrorKind::ConnectionRefused).into()
}

#[track_caller]
fn take_request<T, U>(handle: &mut Handle<T, U>) -> (T, SendResponse<U>) {
    match handle.poll_request() {
        Poll::Ready(Some(r)) => r,
        Poll::Ready(None) => panic!("the service was dropped"),
        Poll::Pending => panic!("expected a request, none was made"),
    }
}

#[track_caller]
fn no_request<T, U>(handle: &mut Handle<T, U>) {
    assert!(
        handle.poll_request().is_pending(),
        "no request was expected"
    );
}

fn status(code: u16, retry_after: Option<&str>) -> Response<()> {
    let mut b = Response::builder().status(code);
    if let Some(v) = retry_after {
        b = b.header(RETRY_AFTER, v);
    }
    b.body(()).unwrap()
}

fn exact(base: Duration) -> Backoff {
    Backoff::exponential(base)
        .with_max_delay(Duration::from_secs(10))
        .with_jitter(Jitter::None)
}

#[tokio::test(start_paused = true)]
async fn delays_match_the_backoff_exactly_without_jitter() {
    let layer = RetryLayer::builder()
        .max_retries(3)
        .backoff(exact(100 * MS))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m: mock::Mock<&str, ()>| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call("req"));

    let (req, send) = take_request(&mut handle);
    assert_eq!(req, "req");
    send.send_error(reset());
    for (i, delay) in [100 * MS, 200 * MS, 400 * MS].into_iter().enumerate() {
        assert_pending!(fut.poll());
        advance(delay - MS).await;
        assert_pending!(fut.poll());
        no_request(&mut handle);
        advance(MS).await;
        assert_pending!(fut.poll());
        let (req, send) = take_request(&mut handle);
        assert_eq!(req, "req");
        send.send_error(format!("failure {}", i + 2));
    }
    // max_retries(3): the fourth attempt was the last; its outcome is returned.
    let err = assert_ready_err!(fut.poll());
    assert_eq!(err.to_string(), "failure 4");
    no_request(&mut handle);
}

#[tokio::test(start_paused = true)]
async fn max_retries_three_means_four_attempts_in_all() {
    let layer = RetryLayer::builder()
        .max_retries(3)
        .backoff(Backoff::constant(Duration::ZERO))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m: mock::Mock<u8, ()>| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(1u8));
    for _ in 0..4 {
        assert_pending!(fut.poll());
        take_request(&mut handle).1.send_error(reset());
    }
    assert_ready_err!(fut.poll());
    no_request(&mut handle);
}

#[tokio::test(start_paused = true)]
async fn a_success_after_failures_is_returned() {
    let layer = RetryLayer::builder()
        .backoff(Backoff::constant(Duration::ZERO))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(1u8));
    take_request(&mut handle).1.send_error(reset());
    assert_pending!(fut.poll());
    take_request(&mut handle).1.send_response("ok");
    assert_eq!(assert_ready_ok!(fut.poll()), "ok");
}

#[tokio::test(start_paused = true)]
async fn non_retryable_outcomes_are_returned_at_once() {
    let classifier = |out: Result<&&str, &BoxError>| match out {
        Ok(_) => Classification::success(),
        Err(_) => Classification::failure().with_retryable(false),
    };
    let layer = RetryLayer::builder()
        .classifier(classifier)
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(1u8));
    take_request(&mut handle).1.send_error("permanent");
    assert_ready_err!(fut.poll());
    no_request(&mut handle);
}

proptest! {
    #[test]
    fn jitter_stays_within_its_bounds(
        base_ms in 1u64..1_000,
        cap_factor in 1u64..100,
        retry in 1u32..64,
        prev_ms in 0u64..100_000,
        unit in 0.0f64..1.0,
        kind in 0u8..3,
    ) {
        let base = Duration::from_millis(base_ms);
        let cap = base * cap_factor as u32;
        let prev = Duration::from_millis(prev_ms);
        let growth = match kind {
            0 => Backoff::constant(base),
            1 => Backoff::linear(base),
            _ => Backoff::exponential(base).with_factor(1.5),
        }
        .with_max_delay(cap);
        let d = growth.with_jitter(Jitter::None).delay(retry, prev, unit);
        prop_assert!(d <= cap && d >= base.min(cap));

        let full = growth.with_jitter(Jitter::Full).delay(retry, prev, unit);
        prop_assert!(full <= d);

        let equal = growth.with_jitter(Jitter::Equal).delay(retry, prev, unit);
        prop_assert!(equal >= d / 2 && equal <= d);

        let dec = growth.with_jitter(Jitter::Decorrelated).delay(retry, prev, unit);
        let high = prev.max(base).saturating_mul(3).min(cap);
        prop_assert!(dec >= base && dec <= high, "{dec:?} not in [{base:?}, {high:?}]");
    }
}

/// The delay the policy takes after a `429` with `Retry-After: 4`, drawing jitter from `rng`.
async fn first_delay(rng: JitterRng, jitter: Jitter, cap: Duration) -> Duration {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook = {
        let seen = seen.clone();
        move |e: &RetryEvent| seen.lock().unwrap().push(e.delay())
    };
    let layer = RetryLayer::http()
        .max_retries(1)
        .backoff(Backoff::exponential(100 * MS).with_jitter(jitter))
        .max_retry_after(cap)
        .rng(rng)
        .on_retry(hook)
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(Request::get("http://a/").body(()).unwrap()));
    take_request(&mut handle)
        .1
        .send_response(status(429, Some("4")));
    assert_pending!(fut.poll());
    seen.lock().unwrap()[0]
}

/// Callers told to come back at the same instant (one `Retry-After`) are spread over
/// up to half the hint more when the backoff jitters — never earlier than the hint —
/// and come back exactly at it when it does not.
#[tokio::test(start_paused = true)]
async fn a_jittering_policy_spreads_retries_past_a_shared_retry_after() {
    let mut spread = Vec::new();
    for seed in 0..32 {
        let d = first_delay(
            JitterRng::seeded(seed),
            Jitter::Full,
            Duration::from_secs(60),
        )
        .await;
        assert!(
            d >= Duration::from_secs(4) && d <= Duration::from_secs(6),
            "{d:?} outside [4 s, 6 s]"
        );
        spread.push(d);
    }
    spread.sort_unstable();
    spread.dedup();
    assert!(spread.len() > 16, "not spread: {spread:?}");
    assert!(spread.iter().any(|d| *d > Duration::from_secs(5)));
    for seed in 0..4 {
        assert_eq!(
            first_delay(
                JitterRng::seeded(seed),
                Jitter::None,
                Duration::from_secs(60)
            )
            .await,
            Duration::from_secs(4)
        );
    }
    // Never past the longest wait for a hint that is allowed.
    let cap = Duration::from_millis(4500);
    for seed in 0..16 {
        let d = first_delay(JitterRng::seeded(seed), Jitter::Full, cap).await;
        assert!(d >= Duration::from_secs(4) && d <= cap, "{d:?}");
    }
}

/// A jitter source that answers outside `[0, 1)` (NaN, negative) spreads nothing past a
/// hint: the retry comes back at the hint, not at its longest spread.
#[tokio::test(start_paused = true)]
async fn a_jitter_source_outside_its_range_adds_no_spread_to_a_retry_after() {
    for unit in [f64::NAN, -1.0, f64::NEG_INFINITY] {
        let d = first_delay(
            JitterRng::from_fn(move || unit),
            Jitter::Full,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(d, Duration::from_secs(4), "unit {unit}");
    }
}

/// The spread past a hint never costs a retry that the hint alone leaves time for.
#[tokio::test(start_paused = true)]
async fn the_spread_past_a_retry_after_gives_way_to_the_deadline() {
    let layer = RetryLayer::http()
        .max_retries(1)
        .backoff(Backoff::exponential(100 * MS).with_jitter(Jitter::Full))
        .rng(postbox::retry::JitterRng::seeded(7))
        .no_budget()
        .build()
        .unwrap();
    for _ in 0..8 {
        let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
        let deadline = tokio::time::Instant::now() + Duration::from_millis(4100);
        assert_ready_ok!(svc.poll_ready());
        let mut fut = task::spawn(svc.call(with_deadline(deadline)));
        take_request(&mut handle)
            .1
            .send_response(status(429, Some("4")));
        assert_pending!(fut.poll());
        advance(Duration::from_millis(4099)).await;
        assert_pending!(fut.poll());
        take_request(&mut handle).1.send_response(status(200, None));
        assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::OK);
    }
}

#[tokio::test(start_paused = true)]
async fn seeded_jitter_is_deterministic_and_within_bounds() {
    async fn delays(seed: u64) -> Vec<Duration> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hook = {
            let seen = seen.clone();
            move |e: &RetryEvent| seen.lock().unwrap().push(e.delay())
        };
        let layer = RetryLayer::builder()
            .max_retries(3)
            .backoff(Backoff::exponential(100 * MS).with_jitter(Jitter::Full))
            .rng(postbox::retry::JitterRng::seeded(seed))
            .on_retry(hook)
            .no_budget()
            .build()
            .unwrap();
        let (mut svc, mut handle) = mock::spawn_with(|m: mock::Mock<(), ()>| layer.layer(m));
        assert_ready_ok!(svc.poll_ready());
        let mut fut = task::spawn(svc.call(()));
        for _ in 0..4 {
            assert_pending!(fut.poll());
            advance(Duration::from_secs(1)).await;
            assert_pending!(fut.poll());
            take_request(&mut handle).1.send_error(reset());
        }
        assert_ready_err!(fut.poll());
        seen.lock().unwrap().clone()
    }
    let a = delays(42).await;
    assert_eq!(a, delays(42).await);
    assert_ne!(a, delays(43).await);
    for (d, max) in a.iter().zip([100 * MS, 200 * MS, 400 * MS]) {
        assert!(*d <= max);
    }
}

fn http_layer(
    requests: HttpRequests,
) -> RetryLayer<postbox::retry::RetryPolicy<postbox::classify::HttpClassifier, HttpRequests, ()>> {
    http_layer_with(requests)
}

/// [`http_layer`] with any request strategy.
fn http_layer_with<R>(
    requests: R,
) -> RetryLayer<postbox::retry::RetryPolicy<postbox::classify::HttpClassifier, R, ()>> {
    RetryLayer::http()
        .requests(requests)
        .max_retries(2)
        .backoff(exact(10 * MS))
        .no_budget()
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_to_the_millisecond_never_early() {
    let layer = http_layer(HttpRequests::new());
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(Request::get("http://a/").body(()).unwrap()));
    take_request(&mut handle)
        .1
        .send_response(status(429, Some("2")));
    assert_pending!(fut.poll());

    advance(1999 * MS).await;
    assert_pending!(fut.poll());
    no_request(&mut handle);

    advance(MS).await;
    assert_pending!(fut.poll());
    take_request(&mut handle).1.send_response(status(200, None));
    assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn sub_millisecond_hints_round_up() {
    let hint = Duration::from_micros(1_500_001);
    let classifier = move |out: Result<&(), &BoxError>| match out {
        Ok(_) => Classification::success(),
        Err(_) => Classification::overload(Some(hint)),
    };
    let layer = RetryLayer::builder()
        .classifier(classifier)
        .backoff(Backoff::constant(Duration::ZERO))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(()));
    take_request(&mut handle).1.send_error("slow down");
    assert_pending!(fut.poll());
    // 1500.001 ms: at 1500 ms the retry would be early by a microsecond.
    advance(1500 * MS).await;
    assert_pending!(fut.poll());
    no_request(&mut handle);
    advance(MS).await;
    assert_pending!(fut.poll());
    take_request(&mut handle);
}

#[tokio::test(start_paused = true)]
async fn an_http_date_in_the_past_means_no_wait() {
    let layer = RetryLayer::http()
        .backoff(Backoff::constant(Duration::ZERO))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(Request::get("http://a/").body(()).unwrap()));
    take_request(&mut handle)
        .1
        .send_response(status(503, Some("Wed, 21 Oct 2015 07:28:00 GMT")));
    assert_pending!(fut.poll());
    // No time passes: the retry is made at once.
    take_request(&mut handle).1.send_response(status(200, None));
    assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::OK);
}

/// A GET carrying a `CallDeadline` at `deadline`, as `DeadlineLayer::http` leaves it.
fn with_deadline(deadline: tokio::time::Instant) -> Request<()> {
    let mut req = Request::get("http://a/").body(()).unwrap();
    req.extensions_mut()
        .insert(postbox::timeout::CallDeadline::new(deadline));
    req
}

/// A retry that could not start before the call's deadline (a `CallDeadline` on the
/// request, as `DeadlineLayer::http` puts there) is not made: the last outcome comes back
/// at once, instead of a `DeadlineExceeded` later. One that can start in time is made.
#[tokio::test(start_paused = true)]
async fn a_retry_that_would_start_after_the_deadline_is_not_made() {
    let layer = http_layer(HttpRequests::new());
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let request = || with_deadline(deadline);
    // At 0.5 s, "retry in 1 s": in time.
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(request()));
    advance(500 * MS).await;
    take_request(&mut handle)
        .1
        .send_response(status(429, Some("1")));
    assert_pending!(fut.poll());
    advance(1000 * MS).await;
    assert_pending!(fut.poll());
    take_request(&mut handle).1.send_response(status(200, None));
    assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::OK);
    // At 1.5 s, "retry in 1 s": past the deadline; the 429 comes back now.
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(request()));
    take_request(&mut handle)
        .1
        .send_response(status(429, Some("1")));
    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    no_request(&mut handle);
}

/// Tokio wakes a sleep at the next whole millisecond: a retry whose backoff ends
/// within a millisecond of the deadline would start after it, so it is not made.
#[tokio::test(start_paused = true)]
async fn a_retry_the_timer_would_wake_after_the_deadline_is_not_made() {
    let layer = RetryLayer::http()
        .max_retries(2)
        .backoff(exact(Duration::from_micros(100_200)))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    let deadline = tokio::time::Instant::now() + Duration::from_micros(100_400);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(with_deadline(deadline)));
    take_request(&mut handle).1.send_response(status(503, None));
    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    no_request(&mut handle);
}

/// A retry tells the next hop the time left now, not the budget of the first attempt:
/// the deadline header a `DeadlineLayer::http` outside wrote is rewritten.
#[tokio::test(start_paused = true)]
async fn a_retry_sends_the_time_left_in_its_deadline_header() {
    let layer = http_layer(HttpRequests::new());
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    let mut req = with_deadline(tokio::time::Instant::now() + Duration::from_secs(2));
    req.headers_mut()
        .insert(postbox::timeout::TIMEOUT_MS_HEADER, 2000.into());
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(req));
    let (first, send) = take_request(&mut handle);
    assert_eq!(first.headers()[postbox::timeout::TIMEOUT_MS_HEADER], "2000");
    advance(1000 * MS).await;
    send.send_response(status(503, None));
    assert_pending!(fut.poll());
    advance(10 * MS).await;
    assert_pending!(fut.poll());
    let (second, send) = take_request(&mut handle);
    let left: u64 = second.headers()[postbox::timeout::TIMEOUT_MS_HEADER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(left, 990);
    send.send_response(status(200, None));
    assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::OK);
}

/// A retry whose backoff is over only once the call's deadline has passed (its task
/// polled late, or on the deadline's own tick) is not sent: the last outcome is
/// returned. It was sent, telling the next hop it had 0 ms.
#[tokio::test(start_paused = true)]
async fn a_retry_polled_after_the_deadline_is_not_sent() {
    let layer = http_layer(HttpRequests::new());
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    let mut req = with_deadline(tokio::time::Instant::now() + Duration::from_secs(1));
    req.headers_mut()
        .insert(postbox::timeout::TIMEOUT_MS_HEADER, 1000.into());
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(req));
    let (_, send) = take_request(&mut handle);
    advance(500 * MS).await;
    send.send_response(status(503, None));
    assert_pending!(fut.poll(), "backing off 10 ms, well before the deadline");
    advance(600 * MS).await;
    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    no_request(&mut handle);
}

/// A service that takes one call at a time and is busy until the body of its last
/// response is dropped (a single connection that an unread body keeps busy).
#[derive(Clone)]
struct OneAtATime {
    busy: Arc<Mutex<(bool, Option<std::task::Waker>)>>,
    answers: Arc<Mutex<Vec<u16>>>,
}

/// A response body that frees its [`OneAtATime`] when dropped.
struct Holds(Arc<Mutex<(bool, Option<std::task::Waker>)>>);

impl Drop for Holds {
    fn drop(&mut self) {
        let mut busy = self.0.lock().unwrap();
        busy.0 = false;
        if let Some(w) = busy.1.take() {
            w.wake();
        }
    }
}

impl tower::Service<Request<()>> for OneAtATime {
    type Response = Response<Holds>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Holds>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        let mut busy = self.busy.lock().unwrap();
        if busy.0 {
            busy.1 = Some(cx.waker().clone());
            return Poll::Pending;
        }
        busy.0 = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        let code = self.answers.lock().unwrap().remove(0);
        let mut res = Response::new(Holds(self.busy.clone()));
        *res.status_mut() = StatusCode::from_u16(code).unwrap();
        std::future::ready(Ok(res))
    }
}

/// The last outcome, kept through the backoff for a call with a deadline, is let go
/// while the service readies for the retry: a service waiting for it (its response's
/// body holds the one connection) would otherwise never be ready.
#[tokio::test(start_paused = true)]
async fn the_last_response_kept_for_the_deadline_does_not_block_the_retry() {
    let svc = OneAtATime {
        busy: Arc::default(),
        answers: Arc::new(Mutex::new(vec![503, 200])),
    };
    let retry = http_layer(HttpRequests::new()).layer(svc);
    let req = with_deadline(tokio::time::Instant::now() + Duration::from_secs(10));
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        tower::ServiceExt::oneshot(retry, req),
    )
    .await
    .expect("the retry waited for a service its kept response held")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// The first attempt tells the next hop the time left when it is sent, not when a
/// `DeadlineLayer::http` outside wrote the header: `BufferBody` waited for the body
/// or for readiness in between (here a retry inside whose service was not ready for
/// 800 ms).
#[tokio::test(start_paused = true)]
async fn the_first_attempt_tells_the_time_left_when_it_is_sent() {
    let retry = http_layer(HttpRequests::new());
    let (mut svc, mut handle) = mock::spawn_with(|m: mock::Mock<Buffered, Response<()>>| {
        ServiceBuilder::new()
            .layer(BufferBodyLayer::new(1024))
            .layer(retry.clone())
            .service(m)
    });
    let request = || {
        let mut req = Request::post("http://a/orders")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        req.extensions_mut()
            .insert(postbox::timeout::CallDeadline::new(
                tokio::time::Instant::now() + Duration::from_secs(1),
            ));
        req.headers_mut()
            .insert(postbox::timeout::TIMEOUT_MS_HEADER, 1000.into());
        req
    };
    handle.allow(0);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(request()));
    assert_pending!(fut.poll());
    advance(800 * MS).await;
    handle.allow(1);
    assert_pending!(fut.poll());
    let (first, _send) = take_request(&mut handle);
    assert_eq!(first.headers()[postbox::timeout::TIMEOUT_MS_HEADER], "200");
}

/// Sends a `$method` gRPC call whose caller set only `grpc-timeout: 2S` through
/// `$layer` (whose backoff is 10 ms): a retry sends the time left, not the full timeout
/// again, and none starts after it.
macro_rules! a_grpc_timeout_the_caller_set_bounds_the_retries {
    ($layer:expr, $method:expr) => {{
        let layer = $layer;
        let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
        let req = Request::builder()
            .method($method)
            .uri("http://a/pkg.Svc/Get")
            .header("content-type", "application/grpc")
            .header("grpc-timeout", "2S")
            .body(())
            .unwrap();
        assert_ready_ok!(svc.poll_ready());
        let mut fut = task::spawn(svc.call(req));
        let (first, send) = take_request(&mut handle);
        assert_eq!(first.headers()["grpc-timeout"], "2S");
        advance(1000 * MS).await;
        send.send_response(status(503, None));
        assert_pending!(fut.poll());
        advance(10 * MS).await;
        assert_pending!(fut.poll());
        let (second, send) = take_request(&mut handle);
        assert_eq!(
            second.headers()["grpc-timeout"],
            postbox::timeout::encode_grpc_timeout(990 * MS).as_str()
        );
        // Only the header the caller sent is rewritten; none is added.
        assert!(
            !second
                .headers()
                .contains_key(postbox::timeout::TIMEOUT_MS_HEADER),
            "{:?}",
            second.headers()
        );
        // At 1.51 s, "retry in 1 s": past the 2 s the caller gave; the 429 comes back now.
        advance(500 * MS).await;
        send.send_response(status(429, Some("1")));
        let res = assert_ready_ok!(fut.poll());
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        no_request(&mut handle);
    }};
}

/// A timeout the caller set only in a header (tonic's `Request::set_timeout` writes
/// `grpc-timeout`; no `DeadlineLayer` outside) is the whole call's.
#[tokio::test(start_paused = true)]
async fn a_grpc_timeout_the_caller_set_shrinks_across_retries_and_bounds_them() {
    a_grpc_timeout_the_caller_set_bounds_the_retries!(http_layer(HttpRequests::new()), Method::GET);
}

/// The same through `GrpcRequests` (the gRPC stack's strategy): it passed every hook
/// on but `prepare`, so each retry got the caller's whole `grpc-timeout` again.
#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn a_grpc_timeout_the_caller_set_shrinks_across_retries_with_grpc_requests() {
    a_grpc_timeout_the_caller_set_bounds_the_retries!(
        http_layer_with(postbox::grpc::GrpcRequests::new().all_idempotent()),
        Method::POST
    );
}

/// The same for `postbox-timeout-ms` on a plain HTTP request; a `grpc-timeout` on one
/// is not read (it means nothing there).
#[tokio::test(start_paused = true)]
async fn a_timeout_ms_header_the_caller_set_bounds_the_retries() {
    let layer = http_layer(HttpRequests::new());
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    let req = Request::get("http://a/")
        .header(postbox::timeout::TIMEOUT_MS_HEADER, "500")
        .header("grpc-timeout", "1m")
        .body(())
        .unwrap();
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(req));
    let (_, send) = take_request(&mut handle);
    advance(300 * MS).await;
    send.send_response(status(503, None));
    assert_pending!(fut.poll());
    advance(10 * MS).await;
    assert_pending!(fut.poll());
    let (second, send) = take_request(&mut handle);
    assert_eq!(second.headers()[postbox::timeout::TIMEOUT_MS_HEADER], "190");
    advance(200 * MS).await;
    send.send_response(status(503, None));
    // At 510 ms: the deadline has passed; no third attempt.
    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    no_request(&mut handle);
}

#[test]
fn a_max_retry_after_above_a_day_is_a_build_error() {
    let err = RetryLayer::http()
        .max_retry_after(Duration::MAX)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "retry.max_retry_after");
    let day = Duration::from_secs(24 * 3600);
    assert!(RetryLayer::http().max_retry_after(day).build().is_ok());
    assert!(
        RetryLayer::http()
            .max_retry_after(day + MS)
            .build()
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn a_hint_above_the_cap_gives_up_at_once() {
    let layer = RetryLayer::http()
        .max_retry_after(Duration::from_secs(60))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(Request::get("http://a/").body(()).unwrap()));
    take_request(&mut handle)
        .1
        .send_response(status(503, Some("3600")));
    // The last outcome, without sleeping for an hour.
    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    no_request(&mut handle);
}

#[tokio::test(start_paused = true)]
async fn a_post_without_a_key_is_not_retried_with_a_key_it_is() {
    let layer = http_layer(HttpRequests::new());
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));

    assert_ready_ok!(svc.poll_ready());
    let post = Request::post("http://a/orders").body(()).unwrap();
    let mut fut = task::spawn(svc.call(post));
    take_request(&mut handle).1.send_response(status(502, None));
    assert_eq!(
        assert_ready_ok!(fut.poll()).status(),
        StatusCode::BAD_GATEWAY
    );
    no_request(&mut handle);

    assert_ready_ok!(svc.poll_ready());
    let keyed = Request::post("http://a/orders")
        .header(IDEMPOTENCY_KEY, "order-17")
        .body(())
        .unwrap();
    let mut fut = task::spawn(svc.call(keyed));
    take_request(&mut handle).1.send_response(status(502, None));
    assert_pending!(fut.poll());
    advance(10 * MS).await;
    assert_pending!(fut.poll());
    let (retried, send) = take_request(&mut handle);
    assert_eq!(retried.method(), Method::POST);
    assert_eq!(retried.headers()[IDEMPOTENCY_KEY], "order-17");
    send.send_response(status(201, None));
    assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::CREATED);
}

/// A generated key makes a `POST` retryable and is sent on every attempt, under the
/// default rule, under a custom one that knows nothing of keys (as
/// `generate_idempotency_key` promises), and with `retry_every_method`
/// (`retry_unsafe_methods`: the service de-duplicates, on the key); idempotent methods
/// get none.
#[tokio::test(start_paused = true)]
async fn a_generated_key_makes_a_post_retryable_and_is_sent_on_every_attempt() {
    let custom = HttpRequests::new().retry_safe_if(|m, _| m.is_idempotent());
    let every_method = HttpRequests::new().retry_every_method();
    for requests in [HttpRequests::new(), custom, every_method] {
        let layer = http_layer(requests.generate_idempotency_key(true));
        let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
        assert_ready_ok!(svc.poll_ready());
        let mut fut = task::spawn(svc.call(Request::post("http://a/").body(()).unwrap()));
        let (first, send) = take_request(&mut handle);
        let key = first.headers()[IDEMPOTENCY_KEY].clone();
        send.send_response(status(503, None));
        assert_pending!(fut.poll());
        advance(10 * MS).await;
        assert_pending!(fut.poll());
        let (second, send) = take_request(&mut handle);
        assert_eq!(second.headers()[IDEMPOTENCY_KEY], key);
        send.send_response(status(201, None));
        assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::CREATED);

        // Idempotent methods are left alone.
        assert_ready_ok!(svc.poll_ready());
        let mut fut = task::spawn(svc.call(Request::get("http://a/").body(()).unwrap()));
        let (get, send) = take_request(&mut handle);
        assert!(get.headers().get(IDEMPOTENCY_KEY).is_none());
        send.send_response(status(200, None));
        assert_ready_ok!(fut.poll());
    }
}

#[tokio::test(start_paused = true)]
async fn a_connect_error_is_retried_even_for_a_post() {
    let layer = http_layer(HttpRequests::new());
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(Request::post("http://a/").body(()).unwrap()));
    take_request(&mut handle).1.send_error(refused());
    assert_pending!(fut.poll());
    advance(10 * MS).await;
    assert_pending!(fut.poll());
    take_request(&mut handle).1.send_response(status(200, None));
    assert_ready_ok!(fut.poll());
}

/// A `408 Request Timeout` may be a handler cut short by a server timeout (tower-http's
/// `TimeoutLayer::new`), which did its work, even with `Connection: close` (hyper adds
/// it to every answer once a connection's keep-alive is off, as in a graceful
/// shutdown): a `POST` without a key is not repeated. A classifier told that the
/// dependency's `408`s are only RFC 9110's (the request never arrived whole) retries it.
#[tokio::test(start_paused = true)]
async fn a_408_that_closes_its_connection_is_not_repeated_for_a_post() {
    let closing = || {
        let mut res = status(408, None);
        res.headers_mut()
            .insert(http::header::CONNECTION, "close".parse().unwrap());
        res
    };
    let layer = http_layer(HttpRequests::new());
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(Request::post("http://a/").body(()).unwrap()));
    take_request(&mut handle).1.send_response(closing());
    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT, "not retried");
    advance(10 * MS).await;
    no_request(&mut handle);

    let rfc = RetryLayer::http()
        .classifier(postbox::classify::HttpClassifier::new().with_status(
            StatusCode::REQUEST_TIMEOUT,
            Classification::failure().with_effect(false),
        ))
        .max_retries(2)
        .backoff(exact(10 * MS))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| rfc.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(Request::post("http://a/").body(()).unwrap()));
    take_request(&mut handle).1.send_response(closing());
    assert_pending!(fut.poll());
    advance(10 * MS).await;
    assert_pending!(fut.poll());
    let (retried, send) = take_request(&mut handle);
    assert_eq!(retried.method(), Method::POST);
    send.send_response(status(201, None));
    assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::CREATED);
}

/// A keyed `POST` answered `409` with `Retry-After` (the idempotency layer's "request
/// in progress": an earlier attempt cut short by our attempt timeout still runs there)
/// is asked again after the hint and gets the first request's answer. Before, the
/// `409` was the caller's answer.
#[tokio::test(start_paused = true)]
async fn a_request_still_in_progress_is_asked_again_after_its_hint() {
    let layer = http_layer(HttpRequests::new());
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let req = Request::post("http://a/orders")
        .header(IDEMPOTENCY_KEY, "order-18")
        .body(())
        .unwrap();
    let mut fut = task::spawn(svc.call(req));
    take_request(&mut handle)
        .1
        .send_response(status(409, Some("1")));
    assert_pending!(fut.poll());
    advance(999 * MS).await;
    assert_pending!(fut.poll());
    no_request(&mut handle);
    advance(MS).await;
    assert_pending!(fut.poll());
    let (again, send) = take_request(&mut handle);
    assert_eq!(again.headers()[IDEMPOTENCY_KEY], "order-18");
    send.send_response(status(201, None));
    assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::CREATED);
}

#[tokio::test(start_paused = true)]
async fn a_budget_of_20_percent_with_floor_0_allows_2_retries_after_10_first_attempts() {
    let budget = RetryBudget::builder()
        .ratio(0.2)
        .min_retries_per_sec(0)
        .build()
        .unwrap();
    let layer = RetryLayer::builder()
        .max_retries(1)
        .backoff(Backoff::constant(Duration::ZERO))
        .budget(budget.clone())
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    for _ in 0..10 {
        assert_ready_ok!(svc.poll_ready());
        let mut fut = task::spawn(svc.call(()));
        take_request(&mut handle).1.send_response("ok");
        assert_ready_ok!(fut.poll());
    }
    // Two failing calls are retried…
    for _ in 0..2 {
        assert_ready_ok!(svc.poll_ready());
        let mut fut = task::spawn(svc.call(()));
        take_request(&mut handle).1.send_error(reset());
        assert_pending!(fut.poll());
        take_request(&mut handle).1.send_response("ok");
        assert_ready_ok!(fut.poll());
    }
    // …the third is not: the budget returns the last outcome.
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(()));
    take_request(&mut handle).1.send_error("third failure");
    let err = assert_ready_err!(fut.poll());
    assert_eq!(err.to_string(), "third failure");
    no_request(&mut handle);
    assert_eq!(budget.available(tokio::time::Instant::now()), 0);
}

#[tokio::test(start_paused = true)]
async fn one_budget_is_shared_by_clones_and_layers() {
    let budget = RetryBudget::builder()
        .ratio(0.5)
        .min_retries_per_sec(0)
        .build()
        .unwrap();
    let make = || {
        RetryLayer::builder()
            .backoff(Backoff::constant(Duration::ZERO))
            .budget(budget.clone())
            .build()
            .unwrap()
    };
    let (a, b) = (make(), make());
    assert!(
        a.policy()
            .budget()
            .unwrap()
            .ptr_eq(b.policy().budget().unwrap())
    );
    let (mut svc_a, mut handle_a) = mock::spawn_with(|m| a.layer(m));
    let (mut svc_b, mut handle_b) = mock::spawn_with(|m: mock::Mock<(), ()>| b.layer(m));
    // Two first attempts through `a` (one deposit each) pay for one retry in `b`.
    for _ in 0..2 {
        assert_ready_ok!(svc_a.poll_ready());
        let mut fut = task::spawn(svc_a.call(()));
        take_request(&mut handle_a).1.send_response(());
        assert_ready_ok!(fut.poll());
    }
    assert_ready_ok!(svc_b.poll_ready());
    let mut fut = task::spawn(svc_b.call(()));
    take_request(&mut handle_b).1.send_error(reset());
    assert_pending!(fut.poll());
    take_request(&mut handle_b).1.send_error(reset());
    // 3 deposits at 50% allow 1 retry: the second failure is returned.
    assert_ready_err!(fut.poll());
}

type Buffered = Request<ReplayBody<Full<Bytes>>>;

#[tokio::test(start_paused = true)]
async fn a_1_mib_body_under_a_64_kib_limit_is_sent_once_and_not_retried() {
    let retry = RetryLayer::http()
        .backoff(Backoff::constant(Duration::ZERO))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m: mock::Mock<Buffered, Response<()>>| {
        ServiceBuilder::new()
            .layer(BufferBodyLayer::new(64 * 1024))
            .layer(retry.clone())
            .service(m)
    });
    let body = Bytes::from(vec![7u8; 1024 * 1024]);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(
        svc.call(
            Request::put("http://a/blob")
                .body(Full::new(body.clone()))
                .unwrap(),
        ),
    );
    assert_pending!(fut.poll());
    let (req, send) = take_request(&mut handle);
    assert_eq!(
        req.extensions().get::<BodyNotReplayable>(),
        Some(&BodyNotReplayable::new(64 * 1024))
    );
    let sent = req.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(sent, body, "streamed through whole");
    send.send_response(status(503, None));
    assert_eq!(
        assert_ready_ok!(fut.poll()).status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    no_request(&mut handle);
}

#[tokio::test(start_paused = true)]
async fn a_body_under_the_limit_is_replayed_whole_without_a_copy_per_retry() {
    let retry = RetryLayer::http()
        .backoff(Backoff::constant(Duration::ZERO))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m: mock::Mock<Buffered, Response<()>>| {
        ServiceBuilder::new()
            .layer(BufferBodyLayer::new(64 * 1024))
            .layer(retry.clone())
            .service(m)
    });
    let body = Bytes::from(vec![1u8; 10_000]);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(
        svc.call(
            Request::put("http://a/blob")
                .body(Full::new(body.clone()))
                .unwrap(),
        ),
    );
    assert_pending!(fut.poll());
    let (first, send) = take_request(&mut handle);
    // One `Bytes` chunk is kept as it is: the buffer is the caller's own memory.
    let first_ptr = first.body().buffered_bytes().unwrap().as_ptr();
    assert_eq!(first_ptr, body.as_ptr());
    assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), body);
    send.send_response(status(503, None));
    assert_pending!(fut.poll());
    let (second, send) = take_request(&mut handle);
    // The retry shares the buffer (a reference count), it does not copy it.
    assert_eq!(second.body().buffered_bytes().unwrap().as_ptr(), first_ptr);
    assert_eq!(second.into_body().collect().await.unwrap().to_bytes(), body);
    send.send_response(status(200, None));
    assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn an_open_breakers_rejection_is_not_retried_before_its_retry_after() {
    let layer = RetryLayer::builder()
        .classifier(ErrorClassifier::new())
        .backoff(exact(10 * MS))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(()));
    let open: BoxError = Open::new(Duration::from_secs(5)).into();
    take_request(&mut handle).1.send_error(open);
    assert_pending!(fut.poll());
    advance(4999 * MS).await;
    assert_pending!(fut.poll());
    no_request(&mut handle);
    advance(MS).await;
    assert_pending!(fut.poll());
    take_request(&mut handle).1.send_response(());
    assert_ready_ok!(fut.poll());
}

/// An open breaker's rejection certainly had no effect: a POST without an
/// idempotency key (not retry-safe) is retried after it all the same.
#[tokio::test(start_paused = true)]
async fn an_open_breakers_rejection_of_a_post_is_retried() {
    let layer = http_layer(HttpRequests::new());
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(Request::post("http://a/").body(()).unwrap()));
    let open: BoxError = Open::new(Duration::from_secs(1)).into();
    take_request(&mut handle).1.send_error(open);
    assert_pending!(fut.poll());
    advance(1000 * MS).await;
    assert_pending!(fut.poll());
    let (retried, send) = take_request(&mut handle);
    assert_eq!(retried.method(), Method::POST);
    assert!(retried.headers().get(IDEMPOTENCY_KEY).is_none());
    send.send_response(status(200, None));
    assert_eq!(assert_ready_ok!(fut.poll()).status(), StatusCode::OK);
}

/// The spread a jittering policy adds past a server hint is at most its backoff's
/// `max_delay`, however long the hint.
#[tokio::test(start_paused = true)]
async fn the_spread_past_a_hint_is_at_most_the_backoffs_max_delay() {
    for seed in 0..32 {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hook = {
            let seen = seen.clone();
            move |e: &RetryEvent| seen.lock().unwrap().push(e.delay())
        };
        let layer = RetryLayer::http()
            .max_retries(1)
            .backoff(Backoff::exponential(100 * MS).with_max_delay(200 * MS))
            .rng(postbox::retry::JitterRng::seeded(seed))
            .on_retry(hook)
            .no_budget()
            .build()
            .unwrap();
        let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
        assert_ready_ok!(svc.poll_ready());
        let mut fut = task::spawn(svc.call(Request::get("http://a/").body(()).unwrap()));
        take_request(&mut handle)
            .1
            .send_response(status(429, Some("10")));
        assert_pending!(fut.poll());
        let d = seen.lock().unwrap()[0];
        assert!(
            d >= Duration::from_secs(10) && d <= Duration::from_millis(10_200),
            "{d:?} outside [10 s, 10.2 s]"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn readiness_is_polled_again_before_every_retry() {
    let layer = RetryLayer::builder()
        .backoff(exact(10 * MS))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(()));
    take_request(&mut handle).1.send_error(reset());
    assert_pending!(fut.poll());
    advance(10 * MS).await;
    // The backoff is over but the service is not ready: no attempt.
    assert_pending!(fut.poll());
    no_request(&mut handle);
    handle.allow(1);
    assert!(fut.is_woken(), "readiness wakes the retry");
    assert_pending!(fut.poll());
    take_request(&mut handle).1.send_response(());
    assert_ready_ok!(fut.poll());
}

#[tokio::test(start_paused = true)]
async fn a_readiness_error_before_a_retry_is_returned() {
    let layer = RetryLayer::builder()
        .backoff(Backoff::constant(Duration::ZERO))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m: mock::Mock<(), ()>| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(()));
    handle.send_error("not ready");
    take_request(&mut handle).1.send_error(reset());
    let err = assert_ready_err!(fut.poll());
    assert_eq!(err.to_string(), "not ready");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_cancels_the_pending_sleep_and_attempt() {
    let layer = RetryLayer::builder()
        .backoff(exact(10 * MS))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m: mock::Mock<(), ()>| layer.layer(m));

    // Dropped while backing off: no further attempt.
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(()));
    take_request(&mut handle).1.send_error(reset());
    assert_pending!(fut.poll());
    drop(fut);
    advance(Duration::from_secs(1)).await;
    no_request(&mut handle);

    // Dropped while an attempt is in flight: the attempt's future is dropped with it,
    // not left running detached.
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let never = tower::service_fn({
        let dropped = dropped.clone();
        move |()| shared::NeverFuture::<Result<(), BoxError>>::new(dropped.clone())
    });
    let mut fut = task::spawn(tower::ServiceExt::oneshot(layer.layer(never), ()));
    assert_pending!(fut.poll());
    assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst));
    drop(fut);
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the attempt outlived the retry's future"
    );
}

#[tokio::test(start_paused = true)]
async fn the_hook_sees_every_retry_with_attempt_delay_and_reason() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook = {
        let seen = seen.clone();
        move |e: &RetryEvent| {
            seen.lock()
                .unwrap()
                .push((e.attempt(), e.delay(), e.reason().retry_after()))
        }
    };
    let layer = RetryLayer::http()
        .max_retries(2)
        .backoff(exact(100 * MS))
        .on_retry(hook)
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(Request::get("http://a/").body(()).unwrap()));
    take_request(&mut handle).1.send_response(status(500, None));
    assert_pending!(fut.poll());
    advance(100 * MS).await;
    assert_pending!(fut.poll());
    take_request(&mut handle)
        .1
        .send_response(status(429, Some("1")));
    assert_pending!(fut.poll());
    advance(Duration::from_secs(1)).await;
    assert_pending!(fut.poll());
    take_request(&mut handle).1.send_response(status(500, None));
    assert_eq!(
        assert_ready_ok!(fut.poll()).status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (2, 100 * MS, None),
            (3, Duration::from_secs(1), Some(Duration::from_secs(1)))
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_cloned_is_sent_once() {
    #[derive(Debug)]
    struct NotClone;
    let classify = |_: Result<&(), &BoxError>| Classification::failure();
    // `Cloned` needs `Clone`; a one-line strategy for a request type that is not.
    #[derive(Clone)]
    struct Never;
    impl postbox::retry::CloneRequest<NotClone> for Never {
        fn clone_request(&self, _: &NotClone) -> Option<NotClone> {
            None
        }
        fn is_retry_safe(&self, _: &NotClone) -> bool {
            true
        }
    }
    let layer = RetryLayer::builder()
        .classifier(classify)
        .requests(Never)
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(NotClone));
    take_request(&mut handle).1.send_error(reset());
    // Cannot be replayed: the first outcome is the last.
    assert_ready_err!(fut.poll());
    no_request(&mut handle);
}

#[tokio::test(start_paused = true)]
async fn grpc_retry_pushback_is_honoured_never_early() {
    // gRPC calls are all POSTs: a caller that knows its method is safe says so.
    let layer = RetryLayer::http()
        .classifier(postbox::classify::GrpcClassifier::new())
        .requests(HttpRequests::new().retry_safe_if(|_, _| true))
        .backoff(exact(10 * MS))
        .no_budget()
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m| layer.layer(m));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = task::spawn(svc.call(Request::post("http://a/pkg.Svc/Get").body(()).unwrap()));
    let unavailable = Response::builder()
        .header("grpc-status", "14")
        .header("grpc-retry-pushback-ms", "250")
        .body(())
        .unwrap();
    take_request(&mut handle).1.send_response(unavailable);
    assert_pending!(fut.poll());
    advance(249 * MS).await;
    assert_pending!(fut.poll());
    no_request(&mut handle);
    advance(MS).await;
    assert_pending!(fut.poll());
    let ok = Response::builder()
        .header("grpc-status", "0")
        .body(())
        .unwrap();
    take_request(&mut handle).1.send_response(ok);
    assert_ready_ok!(fut.poll());
}

/// A `metrics` recorder that keeps counters by name (labels appended as `{k=v}`).
#[derive(Default)]
struct Counters(Mutex<std::collections::HashMap<String, Arc<std::sync::atomic::AtomicU64>>>);

impl Counters {
    fn get(&self, name: &str) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl metrics::Recorder for Counters {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let mut name = key.name().to_string();
        for label in key.labels() {
            name.push_str(&format!("{{{}={}}}", label.key(), label.value()));
        }
        let counter = self.0.lock().unwrap().entry(name).or_default().clone();
        metrics::Counter::from_arc(counter)
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

#[tokio::test(start_paused = true)]
async fn retries_and_budget_exhaustion_are_counted() {
    let counters = Counters::default();
    let _guard = metrics::set_default_local_recorder(&counters);
    let budget = RetryBudget::builder()
        .ratio(0.2)
        .min_retries_per_sec(0)
        .build()
        .unwrap();
    let layer = RetryLayer::builder()
        .max_retries(1)
        .backoff(Backoff::constant(Duration::ZERO))
        .budget(budget)
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_with(|m: mock::Mock<(), ()>| layer.layer(m));
    for _ in 0..10 {
        assert_ready_ok!(svc.poll_ready());
        let mut fut = task::spawn(svc.call(()));
        take_request(&mut handle).1.send_response(());
        assert_ready_ok!(fut.poll());
    }
    for _ in 0..3 {
        assert_ready_ok!(svc.poll_ready());
        let mut fut = task::spawn(svc.call(()));
        take_request(&mut handle).1.send_error(reset());
        match fut.poll() {
            Poll::Pending => {
                take_request(&mut handle).1.send_error(reset());
                assert_ready_err!(fut.poll());
            }
            Poll::Ready(out) => assert!(out.is_err(), "the budget returns the failure"),
        }
    }
    // 13 first attempts and 2 retries (the third was refused by the budget).
    assert_eq!(counters.get("postbox_retry_attempts_total"), 15);
    assert_eq!(counters.get("postbox_retries_total"), 2);
    assert_eq!(counters.get("postbox_retry_budget_exhausted_total"), 1);
    assert_eq!(
        counters.get("postbox_retry_gave_up_total{reason=budget_exhausted}"),
        1
    );
    assert_eq!(
        counters.get("postbox_retry_gave_up_total{reason=max_retries}"),
        2
    );
}

/// Against a real reqwest client and axum server on loopback.
#[cfg(feature = "reqwest")]
mod real_http {
    use super::*;
    use axum::Router;
    use axum::routing::post;
    use postbox::http::reqwest::ReqwestService;
    use std::net::SocketAddr;
    use tokio::net::TcpListener;
    use tower::ServiceExt;

    /// Every request's `Idempotency-Key` and body, in order.
    type Seen = Arc<Mutex<Vec<(Option<String>, Bytes)>>>;

    /// A server that answers `503` to the first `fail_first` requests, then `200`.
    async fn serve(fail_first: usize) -> (SocketAddr, Seen) {
        let seen: Seen = Arc::default();
        let app = Router::new().route(
            "/orders",
            post({
                let seen = seen.clone();
                move |headers: http::HeaderMap, body: Bytes| async move {
                    let key = headers
                        .get(IDEMPOTENCY_KEY)
                        .map(|v| v.to_str().unwrap().to_owned());
                    let mut seen = seen.lock().unwrap();
                    seen.push((key, body));
                    if seen.len() <= fail_first {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::CREATED
                    }
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, seen)
    }

    fn client(
        limit: usize,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<reqwest::Body>,
        Error = BoxError,
        Future: Send,
    > + Clone {
        ServiceBuilder::new()
            .layer(BufferBodyLayer::new(limit))
            .layer(
                RetryLayer::http()
                    .requests(HttpRequests::new().generate_idempotency_key(true))
                    .backoff(Backoff::constant(10 * MS))
                    .no_budget()
                    .build()
                    .unwrap(),
            )
            .service(ReqwestService::new(
                reqwest::Client::builder().no_proxy().build().unwrap(),
            ))
    }

    #[tokio::test]
    async fn a_post_is_replayed_whole_with_one_generated_key() {
        let (addr, seen) = serve(1).await;
        let body = Bytes::from(vec![b'x'; 10_000]);
        let req = Request::post(format!("http://{addr}/orders"))
            .body(Full::new(body.clone()))
            .unwrap();
        let res = client(64 * 1024).oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].1, body);
        assert_eq!(seen[1].1, body);
        assert!(seen[0].0.is_some(), "a key was generated");
        assert_eq!(seen[0].0, seen[1].0, "the same key on both attempts");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_reaches_the_server_once_and_whole() {
        let (addr, seen) = serve(1).await;
        let body = Bytes::from(vec![b'y'; 1024 * 1024]);
        let req = Request::post(format!("http://{addr}/orders"))
            .body(Full::new(body.clone()))
            .unwrap();
        let res = client(64 * 1024).oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].1, body);
    }
}

/// Attempts that fail at once, with no backoff between them, do not hold the thread for
/// the whole chain: each retry spends the task's Tokio budget, and the future yields
/// when it is spent, then goes on.
#[tokio::test]
async fn a_chain_of_instant_failures_yields_to_the_scheduler() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const RETRIES: usize = 10_000;
    let layer = RetryLayer::builder()
        .max_retries(RETRIES as u32)
        .backoff(Backoff::constant(Duration::ZERO))
        .no_budget()
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let svc = layer.layer(tower::service_fn(move |_: u8| {
        counted.fetch_add(1, Ordering::Relaxed);
        async { Err::<(), BoxError>(reset()) }
    }));
    let mut fut = std::pin::pin!(tower::ServiceExt::oneshot(svc, 1u8));
    let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "the whole chain ran in one poll");
    let made = calls.load(Ordering::Relaxed);
    assert!(made < RETRIES / 10, "{made} attempts before yielding");
    assert!(fut.await.is_err());
    assert_eq!(calls.load(Ordering::Relaxed), RETRIES + 1);
}
