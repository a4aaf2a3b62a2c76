//! Behaviour of `AttemptTimeout` and `Deadline`.

#[path = "../support/mod.rs"]
mod support;

use postbox::BoxError;
use postbox::error::find_cause;
use postbox::timeout::error::{DeadlineExceeded, Elapsed};
use postbox::timeout::{
    AttemptTimeoutLayer, CallDeadline, DeadlineLayer, HttpPropagation, TIMEOUT_MS_HEADER,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::{Counter, NeverFuture};
use tokio::time::{self, Instant};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_test::mock;

fn never_service(
    dropped: Arc<AtomicBool>,
    calls: Counter,
) -> impl Service<u32, Response = u32, Error = BoxError, Future = NeverFuture<Result<u32, BoxError>>>
+ Clone {
    service_fn(move |_req: u32| {
        calls.inc();
        NeverFuture::new(dropped.clone())
    })
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_expiry_drops_the_inner_future() {
    let dropped = Arc::new(AtomicBool::new(false));
    let svc = AttemptTimeoutLayer::new(Duration::from_millis(100))
        .unwrap()
        .layer(never_service(dropped.clone(), Counter::default()));
    let mut fut = tokio_test::task::spawn(svc.oneshot(1));

    assert_pending!(fut.poll());
    time::advance(Duration::from_millis(99)).await;
    assert_pending!(fut.poll());
    assert!(!dropped.load(Ordering::SeqCst));

    time::advance(Duration::from_millis(1)).await;
    let err = assert_ready!(fut.poll()).unwrap_err();
    assert_eq!(
        find_cause::<Elapsed>(&*err).unwrap().after(),
        Duration::from_millis(100)
    );
    // Dropped on expiry, while our own future is still alive.
    assert!(dropped.load(Ordering::SeqCst));
}

/// `Duration::MAX` (the "no limit" idiom) as an attempt timeout or a deadline never
/// panics: added to the clock, it used to overflow `Instant` on the first pending poll
/// (attempt) or in `call` (deadline).
#[tokio::test(start_paused = true)]
async fn huge_budgets_never_panic() {
    let dropped = Arc::new(AtomicBool::new(false));
    let svc = AttemptTimeoutLayer::new(Duration::MAX)
        .unwrap()
        .layer(never_service(dropped.clone(), Counter::default()));
    let mut fut = tokio_test::task::spawn(svc.oneshot(1));
    assert_pending!(fut.poll());
    time::advance(Duration::from_secs(3600)).await;
    assert_pending!(fut.poll());

    let (mut svc, mut handle) =
        mock::spawn_layer::<http::Request<()>, (), _>(DeadlineLayer::http(Duration::MAX).unwrap());
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(http::Request::new(())));
    let (sent, reply) = handle.next_request().await.unwrap();
    assert!(sent.headers().contains_key(TIMEOUT_MS_HEADER));
    assert_pending!(fut.poll());
    reply.send_response(());
    assert_ready_ok!(fut.poll());
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_passes_a_response_that_arrives_in_time() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<u32, u32, _>(AttemptTimeoutLayer::new(Duration::from_secs(1)).unwrap());
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(7));
    assert_pending!(fut.poll());
    time::advance(Duration::from_millis(999)).await;
    let (req, send) = handle.next_request().await.unwrap();
    send.send_response(req * 2);
    assert_eq!(assert_ready_ok!(fut.poll()), 14);
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_passes_inner_errors_through() {
    let (mut svc, mut handle) =
        mock::spawn_layer::<u32, u32, _>(AttemptTimeoutLayer::new(Duration::from_secs(1)).unwrap());
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(7));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("inner broke");
    let err = assert_ready!(fut.poll()).unwrap_err();
    assert_eq!(err.to_string(), "inner broke");
    assert!(find_cause::<Elapsed>(&*err).is_none());
}

#[test]
fn zero_timeouts_are_config_errors() {
    let e = AttemptTimeoutLayer::new(Duration::ZERO).unwrap_err();
    assert_eq!(e.field(), "attempt_timeout");
    assert_eq!(
        DeadlineLayer::new(Duration::ZERO).unwrap_err().field(),
        "deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn deadline_bounds_the_whole_call_and_drops_the_inner_future() {
    let dropped = Arc::new(AtomicBool::new(false));
    let svc = DeadlineLayer::new(Duration::from_secs(2))
        .unwrap()
        .layer(never_service(dropped.clone(), Counter::default()));
    let mut fut = tokio_test::task::spawn(svc.oneshot(1));
    assert_pending!(fut.poll());
    time::advance(Duration::from_millis(1999)).await;
    assert_pending!(fut.poll());
    time::advance(Duration::from_millis(1)).await;
    let err = assert_ready!(fut.poll()).unwrap_err();
    let exceeded = find_cause::<DeadlineExceeded>(&*err).unwrap();
    assert!(!exceeded.expired_before_call());
    assert!(dropped.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn an_expired_deadline_never_calls_inner() {
    let calls = Counter::default();
    let svc = DeadlineLayer::http(Duration::from_secs(5))
        .unwrap()
        .layer(service_fn({
            let calls = calls.clone();
            move |_req: http::Request<()>| {
                calls.inc();
                async { Ok::<_, BoxError>(()) }
            }
        }));
    let past = Instant::now();
    time::advance(Duration::from_secs(1)).await;
    let mut req = http::Request::new(());
    req.extensions_mut().insert(CallDeadline::new(past));

    let err = svc.oneshot(req).await.unwrap_err();
    assert!(
        find_cause::<DeadlineExceeded>(&*err)
            .unwrap()
            .expired_before_call()
    );
    assert_eq!(calls.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_expired_inbound_grpc_timeout_never_calls_inner() {
    let (mut svc, mut handle) = mock::spawn_layer::<http::Request<()>, (), _>(
        DeadlineLayer::with_propagation(
            Duration::from_secs(5),
            HttpPropagation::new().with_inbound_headers(),
        )
        .unwrap(),
    );
    let req = http::Request::builder()
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "0m")
        .body(())
        .unwrap();
    assert_ready_ok!(svc.poll_ready());
    let err = svc.call(req).await.unwrap_err();
    assert!(find_cause::<DeadlineExceeded>(&*err).is_some());
    assert_pending!(handle.poll_request());
}

#[tokio::test(start_paused = true)]
async fn grpc_timeout_header_carries_the_remaining_budget() {
    let (mut svc, mut handle) = mock::spawn_layer::<http::Request<()>, (), _>(
        DeadlineLayer::http(Duration::from_secs(2)).unwrap(),
    );
    let req = http::Request::builder()
        .header("content-type", "application/grpc+proto")
        .body(())
        .unwrap();
    let start = Instant::now();
    assert_ready_ok!(svc.poll_ready());
    let _fut = svc.call(req);
    let (sent, _) = handle.next_request().await.unwrap();
    assert_eq!(sent.headers()["grpc-timeout"], "2000000u");
    assert_eq!(sent.headers()[TIMEOUT_MS_HEADER], "2000");
    assert_eq!(
        sent.extensions().get::<CallDeadline>().unwrap().at(),
        start + Duration::from_secs(2)
    );
}

/// A shorter `grpc-timeout` (or `postbox-timeout-ms`) the caller set itself (tonic's
/// `Request::set_timeout`) wins: both headers and the `CallDeadline` a retry inside
/// reads carry it; a longer one is lowered to the budget. (Before, it was always
/// overwritten, so the server worked 20 times longer than the caller asked.)
#[tokio::test(start_paused = true)]
async fn a_shorter_timeout_the_caller_set_is_kept() {
    for (set, sent_grpc, sent_ms) in [
        (("100m", "900"), "100000u", "100"),
        (("9S", "150"), "150000u", "150"),
        (("9S", "9000"), "2000000u", "2000"),
    ] {
        let (mut svc, mut handle) = mock::spawn_layer::<http::Request<()>, (), _>(
            DeadlineLayer::http(Duration::from_secs(2)).unwrap(),
        );
        let req = http::Request::builder()
            .header("content-type", "application/grpc")
            .header("grpc-timeout", set.0)
            .header(TIMEOUT_MS_HEADER, set.1)
            .body(())
            .unwrap();
        assert_ready_ok!(svc.poll_ready());
        let start = Instant::now();
        let _fut = svc.call(req);
        let (sent, _) = handle.next_request().await.unwrap();
        assert_eq!(sent.headers()["grpc-timeout"], sent_grpc, "{set:?}");
        assert_eq!(sent.headers()[TIMEOUT_MS_HEADER], sent_ms, "{set:?}");
        // What a retry inside reads: the caller's limit, not the budget.
        let ms: u64 = sent_ms.parse().unwrap();
        assert_eq!(
            sent.extensions().get::<CallDeadline>().unwrap().at(),
            start + Duration::from_millis(ms),
            "{set:?}"
        );
    }
}

/// A caller that set a timeout of zero (`grpc-timeout: 0m`, `postbox-timeout-ms: 0`)
/// left no time at all: the call fails with `DeadlineExceeded` before it is sent.
/// (It was sent with a deadline of now, while the layer's timer ran its whole budget.)
/// A signed value (`+120`) is no timeout.
#[tokio::test(start_paused = true)]
async fn a_zero_timeout_the_caller_set_fails_before_the_call() {
    for (name, value) in [("grpc-timeout", "0m"), (TIMEOUT_MS_HEADER, "0")] {
        let (mut svc, mut handle) = mock::spawn_layer::<http::Request<()>, (), _>(
            DeadlineLayer::http(Duration::from_secs(2)).unwrap(),
        );
        let req = http::Request::builder()
            .header("content-type", "application/grpc")
            .header(name, value)
            .body(())
            .unwrap();
        assert_ready_ok!(svc.poll_ready());
        let err = svc.call(req).await.unwrap_err();
        let e = err
            .downcast_ref::<DeadlineExceeded>()
            .expect("DeadlineExceeded");
        assert!(e.expired_before_call(), "{name}");
        let mut next = tokio_test::task::spawn(handle.next_request());
        assert_pending!(next.poll(), "{name}: the request was sent");
    }
    let (mut svc, mut handle) = mock::spawn_layer::<http::Request<()>, (), _>(
        DeadlineLayer::http(Duration::from_secs(2)).unwrap(),
    );
    let req = http::Request::builder()
        .header(TIMEOUT_MS_HEADER, "+120")
        .body(())
        .unwrap();
    assert_ready_ok!(svc.poll_ready());
    let _fut = svc.call(req);
    let (sent, _) = handle.next_request().await.unwrap();
    assert_eq!(
        sent.headers()[TIMEOUT_MS_HEADER],
        "2000",
        "+120 was read as 120"
    );
}

/// A deadline under a millisecond away, set by a deadline layer outside, is not over:
/// the attempt timeout inside reads the exact `CallDeadline`, not the header the
/// outer layer wrote rounded down to `0` (every call through such a stack failed).
#[tokio::test(start_paused = true)]
async fn a_deadline_under_a_millisecond_away_is_not_over_for_the_layer_inside() {
    let svc = tower::ServiceBuilder::new()
        .layer(DeadlineLayer::http(Duration::from_micros(500)).unwrap())
        .layer(AttemptTimeoutLayer::http(Duration::from_secs(1)).unwrap())
        .service(tower::service_fn(|req: http::Request<()>| async move {
            Ok::<_, BoxError>(req.headers()[TIMEOUT_MS_HEADER].clone())
        }));
    let sent = svc.oneshot(http::Request::new(())).await.unwrap();
    assert_eq!(
        sent, "0",
        "the next hop is told less than a millisecond is left"
    );
}

/// The attempt timeout inside a deadline layer tells the next hop the call's exact
/// deadline: the headers the outer layer wrote with its `CallDeadline` are not a
/// shorter limit the caller set. (Read as one, the milliseconds header, rounded down,
/// cut the attempt's deadline by up to a millisecond, and under a millisecond left it
/// sent `grpc-timeout: 0n`, which a gRPC server fails at once.)
#[tokio::test(start_paused = true)]
async fn an_attempt_inside_a_deadline_tells_the_exact_deadline_not_the_rounded_header() {
    for (budget, told) in [(1_500, "1500000n"), (500, "500000n")] {
        let start = Instant::now();
        let svc = tower::ServiceBuilder::new()
            .layer(DeadlineLayer::http(Duration::from_micros(budget)).unwrap())
            .layer(AttemptTimeoutLayer::http(Duration::from_secs(1)).unwrap())
            .service(tower::service_fn(|req: http::Request<()>| async move {
                let at = req.extensions().get::<CallDeadline>().unwrap().at();
                Ok::<_, BoxError>((req.headers()["grpc-timeout"].clone(), at))
            }));
        let mut req = http::Request::new(());
        req.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        let (sent, at) = svc.oneshot(req).await.unwrap();
        assert_eq!(sent, told, "a budget of {budget} µs");
        assert_eq!(at, start + Duration::from_micros(budget));
    }
}

/// A shorter limit the caller set in `grpc-timeout` still wins beside a
/// `CallDeadline` it carries (one copied from the request it serves): only a header
/// within a millisecond of the deadline is taken for a layer's rounded copy of it.
#[tokio::test(start_paused = true)]
async fn a_shorter_caller_timeout_beside_a_call_deadline_still_wins() {
    let start = Instant::now();
    let svc = AttemptTimeoutLayer::http(Duration::from_secs(5))
        .unwrap()
        .layer(tower::service_fn(|req: http::Request<()>| async move {
            let at = req.extensions().get::<CallDeadline>().unwrap().at();
            Ok::<_, BoxError>((req.headers()["grpc-timeout"].clone(), at))
        }));
    let mut req = http::Request::new(());
    req.extensions_mut()
        .insert(CallDeadline::new(start + Duration::from_secs(1)));
    let h = req.headers_mut();
    h.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-timeout", http::HeaderValue::from_static("100m"));
    let (sent, at) = svc.oneshot(req).await.unwrap();
    assert_eq!(sent, "100000u");
    assert_eq!(at, start + Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn plain_http_requests_get_the_timeout_ms_header_but_no_grpc_timeout() {
    let (mut svc, mut handle) = mock::spawn_layer::<http::Request<()>, (), _>(
        DeadlineLayer::http(Duration::from_millis(750)).unwrap(),
    );
    assert_ready_ok!(svc.poll_ready());
    let _fut = svc.call(http::Request::new(()));
    let (sent, _) = handle.next_request().await.unwrap();
    assert_eq!(sent.headers()[TIMEOUT_MS_HEADER], "750");
    assert!(sent.headers().get("grpc-timeout").is_none());
}

/// A budget of more than `u64::MAX` milliseconds is sent as the largest header, not
/// wrapped to its low 64 bits (which made it 384 ms).
#[tokio::test(start_paused = true)]
async fn a_budget_beyond_the_header_range_is_sent_saturated_not_wrapped() {
    let budget = Duration::from_secs(18_446_744_073_709_552);
    let (mut svc, mut handle) =
        mock::spawn_layer::<http::Request<()>, (), _>(DeadlineLayer::http(budget).unwrap());
    assert_ready_ok!(svc.poll_ready());
    let _fut = svc.call(http::Request::new(()));
    let (sent, _) = handle.next_request().await.unwrap();
    let ms: u64 = sent.headers()[TIMEOUT_MS_HEADER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms > 1 << 60, "sent {ms} ms");
}

#[tokio::test(start_paused = true)]
async fn the_earliest_deadline_wins_when_nested() {
    // An outer deadline of 300 ms around an inner one of 2 s: the inner layer sees 300 ms.
    let outer = DeadlineLayer::http(Duration::from_millis(300)).unwrap();
    let inner = DeadlineLayer::http(Duration::from_secs(2)).unwrap();
    let (mock, mut handle) = mock::pair::<http::Request<()>, ()>();
    let mut svc = tower_test::mock::Spawn::new(outer.layer(inner.layer(mock)));
    assert_ready_ok!(svc.poll_ready());
    let _fut = svc.call(http::Request::new(()));
    let (sent, _) = handle.next_request().await.unwrap();
    assert_eq!(sent.headers()[TIMEOUT_MS_HEADER], "300");
}

/// An attempt tells the next hop when it ends: a 1 s attempt timeout inside a 10 s
/// deadline sends 1 s (it sent the deadline's 10 s, so the next hop worked on for 9 s
/// after this side gave up on the attempt); a deadline sooner than the attempt's end
/// wins.
#[tokio::test(start_paused = true)]
async fn an_http_attempt_timeout_narrows_the_propagated_deadline() {
    for (deadline_ms, sent_ms) in [(10_000, "1000"), (300, "300")] {
        let outer = DeadlineLayer::http(Duration::from_millis(deadline_ms)).unwrap();
        let attempt = AttemptTimeoutLayer::http(Duration::from_secs(1)).unwrap();
        let (mock, mut handle) = mock::pair::<http::Request<()>, ()>();
        let mut svc = tower_test::mock::Spawn::new(outer.layer(attempt.layer(mock)));
        let start = Instant::now();
        assert_ready_ok!(svc.poll_ready());
        let _fut = svc.call(http::Request::new(()));
        let (sent, _) = handle.next_request().await.unwrap();
        assert_eq!(sent.headers()[TIMEOUT_MS_HEADER], sent_ms);
        assert_eq!(
            sent.extensions().get::<CallDeadline>().unwrap().at(),
            start + Duration::from_millis(sent_ms.parse().unwrap())
        );
    }
}

/// The attempt still times out at its own end, and its error is still `Elapsed`.
#[tokio::test(start_paused = true)]
async fn an_http_attempt_timeout_still_expires_as_elapsed() {
    let (mut svc, mut handle) = mock::spawn_layer::<http::Request<()>, (), _>(
        AttemptTimeoutLayer::http(Duration::from_millis(100)).unwrap(),
    );
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(http::Request::new(())));
    let (sent, _reply) = handle.next_request().await.unwrap();
    assert_eq!(sent.headers()[TIMEOUT_MS_HEADER], "100");
    assert_pending!(fut.poll());
    time::advance(Duration::from_millis(100)).await;
    let err = assert_ready!(fut.poll()).unwrap_err();
    assert!(find_cause::<Elapsed>(&*err).is_some(), "{err}");
}

/// A tonic `Channel` enforces the `grpc-timeout` an attempt timeout sends, so the
/// channel's own `TimeoutExpired` comes at the same instant as the layer's end (and
/// was returned: the inner future is polled first). The attempt still ends as the
/// layer's `Elapsed`, which tonic would otherwise report as `CANCELLED`; a deadline
/// layer's likewise as `DeadlineExceeded`.
#[cfg(feature = "grpc")]
#[tokio::test(start_paused = true)]
async fn an_attempt_cut_by_the_channels_own_grpc_timeout_is_still_elapsed() {
    use postbox::timeout::parse_grpc_timeout;
    let channel = || {
        service_fn(|req: http::Request<()>| async move {
            let timeout = parse_grpc_timeout(req.headers()["grpc-timeout"].as_bytes()).unwrap();
            time::sleep(timeout).await;
            Err::<(), BoxError>(Box::new(tonic::TimeoutExpired(())))
        })
    };
    let grpc = || {
        http::Request::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap()
    };
    // 100 s or more goes out in milliseconds, rounded down: the channel's timer ends
    // up to a millisecond before ours, and its error is still the deadline's. (It was
    // passed on as tonic's `CANCELLED`, a retryable failure.)
    for budget in [
        Duration::from_millis(100),
        Duration::from_nanos(150_000_123_456),
    ] {
        let attempt = AttemptTimeoutLayer::http(budget).unwrap().layer(channel());
        let err = attempt.oneshot(grpc()).await.unwrap_err();
        assert!(find_cause::<Elapsed>(&*err).is_some(), "{budget:?}: {err}");
        let deadline = DeadlineLayer::http(budget).unwrap().layer(channel());
        let err = deadline.oneshot(grpc()).await.unwrap_err();
        assert!(
            find_cause::<DeadlineExceeded>(&*err).is_some(),
            "{budget:?}: {err}"
        );
    }
}

/// An inner failure before the end is passed on as it is, and an inner layer's own
/// timeout at the same end keeps its error (it says more than the outer's).
#[tokio::test(start_paused = true)]
async fn an_inner_timeout_at_the_same_end_keeps_its_own_error() {
    let inner = AttemptTimeoutLayer::new(Duration::from_millis(100))
        .unwrap()
        .layer(never_service(Arc::default(), Counter::default()));
    let svc = DeadlineLayer::new(Duration::from_millis(100))
        .unwrap()
        .layer(inner);
    let err = svc.oneshot(1).await.unwrap_err();
    assert!(find_cause::<Elapsed>(&*err).is_some(), "{err}");

    let refused = tower::service_fn(|_: u32| async {
        Err::<u32, BoxError>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into())
    });
    let svc = DeadlineLayer::new(Duration::from_millis(100))
        .unwrap()
        .layer(refused);
    let err = svc.oneshot(1).await.unwrap_err();
    let io = find_cause::<std::io::Error>(&*err).expect("the inner failure");
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(find_cause::<DeadlineExceeded>(&*err).is_none(), "{err}");
}

/// An attempt whose call's deadline comes before its own end is cut at the call's
/// deadline, with `DeadlineExceeded` (the call is over), even with no deadline layer
/// outside to time it (a caller-set header a retry layer anchored).
#[tokio::test(start_paused = true)]
async fn an_http_attempt_is_cut_at_a_sooner_call_deadline() {
    let (mut svc, mut handle) = mock::spawn_layer::<http::Request<()>, (), _>(
        AttemptTimeoutLayer::http(Duration::from_secs(5)).unwrap(),
    );
    let mut req = http::Request::new(());
    req.extensions_mut()
        .insert(CallDeadline::new(Instant::now() + Duration::from_secs(3)));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(req));
    let (_sent, _reply) = handle.next_request().await.unwrap();
    assert_pending!(fut.poll());
    time::advance(Duration::from_millis(2999)).await;
    assert_pending!(fut.poll());
    time::advance(Duration::from_millis(1)).await;
    let err = assert_ready!(fut.poll()).unwrap_err();
    let exceeded = find_cause::<DeadlineExceeded>(&*err).expect("DeadlineExceeded");
    assert!(!exceeded.expired_before_call());
    assert!(find_cause::<Elapsed>(&*err).is_none(), "{err}");
}

/// An attempt whose call's deadline passed before it (a retry that waited for
/// readiness past it) is not sent with a zero timeout: it fails with
/// `DeadlineExceeded`, expired before the call, and the inner service is not called.
#[tokio::test(start_paused = true)]
async fn an_http_attempt_after_the_deadline_is_not_made() {
    let (mut svc, mut handle) = mock::spawn_layer::<http::Request<()>, (), _>(
        AttemptTimeoutLayer::http(Duration::from_secs(1)).unwrap(),
    );
    let past = Instant::now();
    time::advance(Duration::from_millis(5)).await;
    let mut req = http::Request::new(());
    req.extensions_mut().insert(CallDeadline::new(past));
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(req));
    let err = assert_ready!(fut.poll()).unwrap_err();
    assert!(
        find_cause::<DeadlineExceeded>(&*err)
            .unwrap()
            .expired_before_call()
    );
    assert!(handle.poll_request().is_pending(), "the attempt was sent");
}

#[tokio::test(start_paused = true)]
async fn servers_honour_the_callers_timeout_header() {
    let layer = DeadlineLayer::with_propagation(
        Duration::from_secs(10),
        HttpPropagation::new().with_inbound_headers(),
    )
    .unwrap();
    let (mut svc, mut handle) = mock::spawn_layer::<http::Request<()>, (), _>(layer);
    let req = http::Request::builder()
        .header(TIMEOUT_MS_HEADER, "120")
        .body(())
        .unwrap();
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(req));
    let (_sent, _send) = handle.next_request().await.unwrap();
    time::advance(Duration::from_millis(119)).await;
    assert_pending!(fut.poll());
    time::advance(Duration::from_millis(1)).await;
    let err = assert_ready!(fut.poll()).unwrap_err();
    assert!(find_cause::<DeadlineExceeded>(&*err).is_some());
}

/// A server that does not trust the previous hop (`honour_inbound_deadline = false`)
/// must not let a remote client's `postbox-timeout-ms: 0` or `grpc-timeout` cut its
/// budget on the way to the handler: the headers are overwritten with its own
/// deadline. (Before, the outbound step took them for a shorter caller-set limit.)
#[tokio::test(start_paused = true)]
async fn an_untrusting_server_ignores_the_timeout_headers_it_received() {
    let layer = DeadlineLayer::with_propagation(
        Duration::from_secs(3),
        HttpPropagation::new().ignoring_inbound_headers(),
    )
    .unwrap();
    let (mut svc, mut handle) = mock::spawn_layer::<http::Request<()>, (), _>(layer);
    let req = http::Request::builder()
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "1m")
        .header(TIMEOUT_MS_HEADER, "0")
        .body(())
        .unwrap();
    let start = Instant::now();
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(req));
    let (sent, send) = handle.next_request().await.unwrap();
    assert_eq!(sent.headers()[TIMEOUT_MS_HEADER], "3000");
    assert_eq!(sent.headers()["grpc-timeout"], "3000000u");
    assert_eq!(
        sent.extensions().get::<CallDeadline>().unwrap().at(),
        start + Duration::from_secs(3)
    );
    time::advance(Duration::from_millis(2999)).await;
    assert_pending!(fut.poll());
    send.send_response(());
    assert_ready_ok!(fut.poll());

    // Without a gRPC content type (tonic does not check it) the remote `grpc-timeout`
    // is removed, not passed on; an upper-case content type is still gRPC.
    for (content_type, grpc_timeout) in [(None, None), (Some("Application/GRPC"), Some("3000000u"))]
    {
        let mut req = http::Request::builder().header("grpc-timeout", "1n");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        assert_ready_ok!(svc.poll_ready());
        let _fut = svc.call(req.body(()).unwrap());
        let (sent, _) = handle.next_request().await.unwrap();
        assert_eq!(
            sent.headers()
                .get("grpc-timeout")
                .map(|v| v.to_str().unwrap()),
            grpc_timeout,
            "{content_type:?}"
        );
    }
}

/// `grpc-timeout` means nothing on a plain HTTP request: it neither bounds a
/// trusting server's deadline nor counts as a caller-set limit on the way out.
#[tokio::test(start_paused = true)]
async fn grpc_timeout_on_a_plain_http_request_is_not_read() {
    for propagation in [
        HttpPropagation::new(),
        HttpPropagation::new().with_inbound_headers(),
    ] {
        let layer = DeadlineLayer::with_propagation(Duration::from_secs(2), propagation).unwrap();
        let (mut svc, mut handle) = mock::spawn_layer::<http::Request<()>, (), _>(layer);
        let req = http::Request::builder()
            .header("grpc-timeout", "5m")
            .body(())
            .unwrap();
        assert_ready_ok!(svc.poll_ready());
        let _fut = svc.call(req);
        let (sent, _) = handle.next_request().await.unwrap();
        assert_eq!(sent.headers()[TIMEOUT_MS_HEADER], "2000", "{propagation:?}");
    }
}

/// A response body that sends its first chunk, then stalls forever (a server that
/// answered the head and hung).
struct StallingBody {
    sent: bool,
}

impl http_body::Body for StallingBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if std::mem::replace(&mut self.sent, true) {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(Some(Ok(http_body::Frame::data("first".into()))))
        }
    }
}

/// With `BodyDeadlineLayer` inside `DeadlineLayer::http`, a body that stalls after
/// its head fails with `BodyDeadlineExceeded` when the call's deadline passes (the
/// head came in time, so the deadline layer alone would leave the read unbounded),
/// and maps to `504` / `DEADLINE_EXCEEDED`.
#[tokio::test(start_paused = true)]
async fn a_body_stalled_after_its_head_fails_at_the_call_deadline() {
    use http_body_util::BodyExt;
    use postbox::timeout::BodyDeadlineLayer;
    use postbox::timeout::error::BodyDeadlineExceeded;
    let svc = tower::ServiceBuilder::new()
        .layer(DeadlineLayer::http(Duration::from_secs(2)).unwrap())
        .layer(BodyDeadlineLayer::new())
        .service(service_fn(|_req: http::Request<()>| async {
            time::sleep(Duration::from_millis(500)).await;
            Ok::<_, BoxError>(http::Response::new(StallingBody { sent: false }))
        }));
    let start = Instant::now();
    let res = svc.oneshot(http::Request::new(())).await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(500),
        "the head in time"
    );
    let mut body = std::pin::pin!(res.into_body());
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "first");
    // (Bounded, so that a regression fails instead of hanging.)
    let err = time::timeout(Duration::from_secs(60), body.frame())
        .await
        .expect("the body fails at the deadline, not never")
        .unwrap()
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2), "at the deadline");
    let cause = find_cause::<BodyDeadlineExceeded>(&*err).expect("typed");
    assert_eq!(
        postbox::error::to_response(cause).unwrap().status(),
        http::StatusCode::GATEWAY_TIMEOUT
    );
}

/// A call whose deadline passed before its attempt was made (a wait for readiness
/// outlasted it) is not the dependency's failure: nothing was sent. A breaker outside
/// the attempt timeout does not count it, so a half-open breaker is not reopened by a
/// probe that never went out. (Before, it was a failure, and opened this breaker.)
#[tokio::test(start_paused = true)]
async fn a_call_whose_deadline_passed_before_it_was_sent_is_not_a_breaker_failure() {
    use postbox::circuit_breaker::{CircuitBreakerLayer, State};
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let calls = Counter::default();
    let svc = breaker.layer(
        AttemptTimeoutLayer::http(Duration::from_secs(1))
            .unwrap()
            .layer(service_fn({
                let calls = calls.clone();
                move |_req: http::Request<()>| {
                    calls.inc();
                    async { Ok::<_, BoxError>(()) }
                }
            })),
    );
    let past = Instant::now();
    time::advance(Duration::from_millis(10)).await;
    let mut req = http::Request::new(());
    req.extensions_mut().insert(CallDeadline::new(past));
    let err = svc.oneshot(req).await.unwrap_err().into_inner().unwrap();
    assert!(
        find_cause::<DeadlineExceeded>(&*err)
            .unwrap()
            .expired_before_call()
    );
    assert_eq!(calls.get(), 0);
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(handle.metrics().failures(), 0);
}
