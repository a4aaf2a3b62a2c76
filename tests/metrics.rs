//! What the layers count, read back from a real recorder (Prometheus's).
//!
//! Each test installs its recorder for its own thread only, and runs its layers on a
//! current-thread runtime on that thread, so tests in this binary do not see each
//! other's counts.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use postbox::BoxError;
use postbox::bulkhead::BulkheadLayer;
use postbox::retry::RetryLayer;
use std::future::Future;
use std::io;
use tower::{Layer, Service, ServiceExt, service_fn};

/// Runs `test` with a fresh recorder on this thread, in paused time; returns what it
/// recorded.
fn recorded<F: Future<Output = ()>>(test: impl FnOnce() -> F) -> PrometheusHandle {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || rt.block_on(test()));
    handle
}

/// The value of the counter `name{labels}` (its Prometheus line), 0 if absent.
fn counter(handle: &PrometheusHandle, series: &str) -> u64 {
    handle
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

fn reset() -> impl Service<u32, Response = u32, Error = BoxError> + Clone {
    service_fn(|_: u32| async {
        Err::<u32, BoxError>(io::Error::from(io::ErrorKind::ConnectionReset).into())
    })
}

const GAVE_UP: &str = r#"postbox_retry_gave_up_total{reason="max_retries"}"#;

/// With retries switched off, a retryable failure is returned as asked: no "gave up"
/// count (nor `warn`) per call. With one retry allowed, running out of it counts.
#[test]
fn switched_off_retries_count_no_give_up() {
    let retry = |n| {
        RetryLayer::builder()
            .max_retries(n)
            .no_budget()
            .build()
            .unwrap()
    };
    let off = recorded(|| async {
        for _ in 0..3 {
            retry(0).layer(reset()).oneshot(1).await.unwrap_err();
        }
    });
    assert_eq!(counter(&off, GAVE_UP), 0, "{}", off.render());
    let on = recorded(|| async {
        retry(1).layer(reset()).oneshot(1).await.unwrap_err();
    });
    assert_eq!(counter(&on, GAVE_UP), 1, "{}", on.render());
}

/// A bulkhead's rejection is counted once, in `call`, however often `poll_ready` found
/// it full before.
#[test]
fn a_bulkhead_rejection_is_counted_once() {
    let handle = recorded(|| async {
        let hung = service_fn(|_: u32| std::future::pending::<Result<u32, BoxError>>());
        let bulkhead = BulkheadLayer::new(1).unwrap();
        let mut first = bulkhead.layer(hung);
        let mut second = first.clone();
        first.ready().await.unwrap();
        let _running = first.call(1);
        for _ in 0..3 {
            second.ready().await.unwrap(); // ready to fail fast
        }
        let err = second.call(2).await.unwrap_err();
        assert!(
            postbox::error::find_cause::<postbox::bulkhead::error::Full>(&*err).is_some(),
            "{err}"
        );
    });
    let rejected = r#"postbox_calls_total{layer="bulkhead",outcome="rejected"}"#;
    assert_eq!(counter(&handle, rejected), 1, "{}", handle.render());
}

/// A request deferred because the breaker inside the enqueue fallback is open is one
/// rejection: the fallback readies the inner stack once per call (it used to ready it
/// in its own `poll_ready`, then again in the future after reading the body: two).
#[cfg(feature = "http")]
#[test]
fn a_request_deferred_by_an_open_breaker_is_one_rejection() {
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::Full;
    use postbox::circuit_breaker::CircuitBreakerLayer;
    use postbox::classify::HttpClassifier;
    use postbox::enqueue::{BufferedBody, EnqueueFallbackLayer};
    use postbox::queue::MemoryQueue;
    use std::sync::Arc;

    let handle = recorded(|| async {
        let breaker = CircuitBreakerLayer::new().with_classifier(HttpClassifier::new());
        breaker.handle().force_open();
        let dependency = service_fn(|_: Request<BufferedBody<Full<Bytes>>>| async {
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        });
        let svc = EnqueueFallbackLayer::new(Arc::new(MemoryQueue::new()))
            .layer(breaker.layer(dependency));
        let req = Request::post("http://api.test/orders")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
    });
    let rejected = r#"postbox_calls_total{layer="circuit_breaker",outcome="rejected"}"#;
    assert_eq!(counter(&handle, rejected), 1, "{}", handle.render());
}

/// A deferral whose idempotency key the queue holds already stores nothing: it is
/// counted as a `duplicate`, not as another message `enqueued`.
#[cfg(feature = "http")]
#[test]
fn a_deferral_the_queue_holds_already_is_counted_as_a_duplicate() {
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::Full;
    use postbox::circuit_breaker::CircuitBreakerLayer;
    use postbox::classify::HttpClassifier;
    use postbox::enqueue::{BufferedBody, EnqueueFallbackLayer};
    use postbox::queue::MemoryQueue;
    use std::sync::Arc;

    let handle = recorded(|| async {
        let breaker = CircuitBreakerLayer::new().with_classifier(HttpClassifier::new());
        breaker.handle().force_open();
        let dependency = service_fn(|_: Request<BufferedBody<Full<Bytes>>>| async {
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        });
        let svc = EnqueueFallbackLayer::new(Arc::new(MemoryQueue::new()))
            .layer(breaker.layer(dependency));
        for _ in 0..2 {
            let req = Request::post("http://api.test/orders")
                .header("idempotency-key", "order-17")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            let res = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::ACCEPTED);
        }
    });
    let series = |outcome: &str| {
        format!(
            r#"postbox_calls_total{{layer="enqueue",outcome="{outcome}",reason="circuit-open"}}"#
        )
    };
    assert_eq!(
        counter(&handle, &series("enqueued")),
        1,
        "{}",
        handle.render()
    );
    assert_eq!(
        counter(&handle, &series("duplicate")),
        1,
        "{}",
        handle.render()
    );
}

/// A failure not deferred because the message would expire first is counted with its
/// reason, as every other enqueue outcome is.
#[cfg(feature = "http")]
#[test]
fn a_failure_not_deferred_past_the_expiry_is_counted_with_its_reason() {
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use postbox::enqueue::{BufferedBody, EnqueueConfig, EnqueueFallbackLayer};
    use postbox::queue::MemoryQueue;
    use postbox::timeout::error::DeadlineExceeded;
    use std::sync::Arc;
    use std::time::Duration;

    let handle = recorded(|| async {
        let slow = service_fn(|_: Request<BufferedBody<Full<Bytes>>>| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Err::<Response<Full<Bytes>>, BoxError>(Box::new(DeadlineExceeded::new(
                Duration::from_secs(30),
                false,
            )))
        });
        let svc = EnqueueFallbackLayer::with_config(
            Arc::new(MemoryQueue::new()),
            EnqueueConfig::new().ttl(Duration::from_secs(10)),
        )
        .unwrap()
        .layer(slow);
        let req = Request::post("http://api.test/orders")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        assert!(svc.oneshot(req).await.is_err());
    });
    let series =
        r#"postbox_calls_total{layer="enqueue",outcome="not_deferred",reason="deadline-elapsed"}"#;
    assert_eq!(counter(&handle, series), 1, "{}", handle.render());
}

/// A failure that would have been deferred but for the request's body, over
/// `max_body` (known from its size, or found while it was read), is counted as not
/// deferred with its reason: the requests a body limit leaves unprotected show. One
/// that succeeds is not counted. (Such a failure passed through without a count.)
#[cfg(feature = "http")]
#[test]
fn a_failure_not_deferred_for_its_body_size_is_counted() {
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body::{Body, Frame};
    use http_body_util::Full;
    use postbox::enqueue::{BufferedBody, EnqueueConfig, EnqueueFallbackLayer};
    use postbox::queue::MemoryQueue;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    /// A body that tells no size.
    struct NoHint(Full<Bytes>);
    impl Body for NoHint {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }
    }

    async fn send<B>(body: B, status: u16) -> StatusCode
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let inner = service_fn(move |_: Request<BufferedBody<B>>| async move {
            let mut res = Response::new(Full::new(Bytes::new()));
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok::<_, BoxError>(res)
        });
        let svc = EnqueueFallbackLayer::with_config(
            Arc::new(MemoryQueue::new()),
            EnqueueConfig::new().max_body(16),
        )
        .unwrap()
        .layer(inner);
        let req = Request::post("http://api.test/orders").body(body).unwrap();
        svc.oneshot(req).await.unwrap().status()
    }

    let big = || Full::new(Bytes::from(vec![b'x'; 17]));
    let handle = recorded(|| async {
        assert_eq!(send(big(), 503).await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            send(NoHint(big()), 503).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(send(big(), 200).await, StatusCode::OK);
    });
    let series =
        r#"postbox_calls_total{layer="enqueue",outcome="not_deferred",reason="retries-exhausted"}"#;
    assert_eq!(counter(&handle, series), 2, "{}", handle.render());
}

/// An idempotency store that cannot claim a key fails open: the request runs, and is
/// counted as `store_failed` (de-duplication was off for it).
#[cfg(feature = "http")]
#[test]
fn a_request_run_while_the_idempotency_store_fails_is_counted() {
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::Full;
    use postbox::idempotency::{
        Claim, ClaimToken, FingerprintedBody, IdempotencyLayer, IdempotencyStore, StoredResponse,
    };
    use std::sync::Arc;
    use std::time::Duration;

    struct Unreachable;
    impl IdempotencyStore for Unreachable {
        fn claim(
            &self,
            _: &str,
            _: Duration,
        ) -> impl Future<Output = Result<Claim, BoxError>> + Send {
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

    let handle = recorded(|| async {
        let handler = service_fn(|_: Request<FingerprintedBody<Full<Bytes>>>| async {
            let mut res = Response::new(Full::new(Bytes::from_static(b"created")));
            *res.status_mut() = StatusCode::CREATED;
            Ok::<_, BoxError>(res)
        });
        let svc = IdempotencyLayer::with_store(Arc::new(Unreachable)).layer(handler);
        let req = Request::post("http://shop.test/orders")
            .header("idempotency-key", "k")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    });
    let failed = r#"postbox_calls_total{layer="idempotency",outcome="store_failed"}"#;
    assert_eq!(counter(&handle, failed), 1, "{}", handle.render());
}

/// The value of the gauge `name{labels}` (its Prometheus line), if present.
fn gauge(handle: &PrometheusHandle, series: &str) -> Option<f64> {
    handle
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// `postbox_circuit_state` shows a breaker from when it is built (a healthy breaker
/// is 0, not absent), follows its transitions, and goes back to 0 when a keyed breaker
/// is dropped from the map (its key starts closed again; it went on showing 1); the
/// transition is counted under the breaker's name.
#[test]
fn the_circuit_state_gauge_shows_healthy_tripped_and_evicted_breakers() {
    use postbox::circuit_breaker::CircuitBreakerLayer;
    use std::time::Duration;
    const ONE: &str = r#"postbox_circuit_state{breaker="one"}"#;
    const KEY: &str = r#"postbox_circuit_state{breaker="keyed/1"}"#;
    let built = recorded(|| async {
        let _layer = CircuitBreakerLayer::builder().name("one").build().unwrap();
    });
    assert_eq!(gauge(&built, ONE), Some(0.0));
    let tripped = recorded(|| async {
        let layer = CircuitBreakerLayer::builder()
            .name("one")
            .consecutive_failures(1)
            .build()
            .unwrap();
        let mut svc = layer.layer(service_fn(|_: u32| async {
            Err::<(), BoxError>(io::Error::from(io::ErrorKind::ConnectionReset).into())
        }));
        svc.ready().await.unwrap().call(1).await.unwrap_err();
    });
    assert_eq!(
        gauge(&tripped, ONE),
        Some(1.0),
        "a tripped breaker shows open"
    );
    let forced = recorded(|| async {
        let layer = CircuitBreakerLayer::builder().name("one").build().unwrap();
        layer.handle().force_open();
    });
    assert_eq!(
        gauge(&forced, ONE),
        Some(4.0),
        "a breaker forced open shows 4"
    );
    let keyed = recorded(|| async {
        let layer = CircuitBreakerLayer::builder()
            .name("keyed")
            .consecutive_failures(1)
            .keyed(|k: &u32| *k)
            .max_keys(1)
            .build()
            .unwrap();
        let mut svc = layer.layer(service_fn(|k: u32| async move {
            if k == 1 {
                Err::<(), BoxError>(io::Error::from(io::ErrorKind::ConnectionReset).into())
            } else {
                Ok(())
            }
        }));
        svc.ready().await.unwrap().call(1).await.unwrap_err();
        tokio::time::advance(Duration::from_secs(1)).await;
        svc.ready().await.unwrap().call(2).await.unwrap();
    });
    assert_eq!(
        gauge(&keyed, KEY),
        Some(0.0),
        "the evicted open breaker still shows open"
    );
    assert_eq!(
        counter(
            &keyed,
            r#"postbox_circuit_transitions_total{breaker="keyed/1",from="closed",to="open"}"#
        ),
        1,
        "the key's opening is not counted under its breaker"
    );
}

/// A keyed breaker is not on the gauge until it first leaves closed, nor when it is
/// evicted without having left it (a series per key ever seen would grow without bound
/// where keys come from requests), and a breaker dropped from the map while a call was
/// still in flight does not set its key's gauge when that call ends (it showed the
/// dropped breaker opening, for a key whose new breaker is closed).
#[test]
fn a_healthy_key_has_no_series_and_a_dropped_breaker_leaves_the_gauge() {
    use postbox::circuit_breaker::CircuitBreakerLayer;
    use std::time::Duration;
    const ONE: &str = r#"postbox_circuit_state{breaker="keyed/1"}"#;
    const TWO: &str = r#"postbox_circuit_state{breaker="keyed/2"}"#;
    let keyed = recorded(|| async {
        let layer = CircuitBreakerLayer::builder()
            .name("keyed")
            .consecutive_failures(1)
            .keyed(|k: &u32| *k)
            .max_keys(1)
            .build()
            .unwrap();
        let mut svc = layer.layer(service_fn(|k: u32| async move {
            if k == 1 {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Err::<(), BoxError>(io::Error::from(io::ErrorKind::ConnectionReset).into())
            } else {
                Ok(())
            }
        }));
        let mut slow = tokio_test::task::spawn(svc.ready().await.unwrap().call(1));
        assert!(slow.poll().is_pending());
        tokio::time::advance(Duration::from_secs(1)).await;
        svc.ready().await.unwrap().call(2).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(slow.await.is_err());
    });
    assert_eq!(gauge(&keyed, TWO), None, "a healthy key has a series");
    assert_eq!(
        gauge(&keyed, ONE),
        None,
        "the dropped breaker's late opening shows, or its eviction made a series"
    );
    assert_eq!(
        counter(
            &keyed,
            r#"postbox_circuit_transitions_total{breaker="keyed/1",from="closed",to="open"}"#
        ),
        0,
        "the dropped breaker's late opening is counted"
    );
}

/// Every reason the retry layer gives up for has its own `reason` label, as the table
/// in the `retry` module docs says.
#[cfg(feature = "http")]
#[test]
fn each_reason_to_give_up_has_its_label() {
    use http::{Request, Response, StatusCode};
    use postbox::http::body::BodyNotReplayable;
    use postbox::retry::RetryBudget;
    use postbox::retry::backoff::Backoff;
    use postbox::timeout::CallDeadline;
    use std::time::Duration;

    let gave_up = |reason: &str| format!(r#"postbox_retry_gave_up_total{{reason="{reason}"}}"#);
    // 503 with a `Retry-After` of an hour when asked; a reset for a POST.
    let upstream = service_fn(|req: Request<()>| async move {
        if req.method() == http::Method::POST {
            return Err::<Response<()>, BoxError>(
                io::Error::from(io::ErrorKind::ConnectionReset).into(),
            );
        }
        let mut res = Response::new(());
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        if req.uri().path() == "/hint" {
            res.headers_mut()
                .insert("retry-after", "3600".parse().unwrap());
        }
        Ok(res)
    });
    let layer = |budget: Option<RetryBudget>| {
        let b = RetryLayer::http()
            .max_retries(1)
            .backoff(Backoff::constant(Duration::from_millis(10)));
        match budget {
            Some(budget) => b.budget(budget),
            None => b.no_budget(),
        }
        .build()
        .unwrap()
    };
    let get = |path: &str| Request::get(path).body(()).unwrap();
    let handle = recorded(|| async {
        let svc = layer(None).layer(upstream);
        // Not replayable.
        let mut req = get("/");
        req.extensions_mut().insert(BodyNotReplayable::new(64));
        svc.clone().oneshot(req).await.unwrap();
        // Not retry-safe: a POST that may have reached the server.
        let post = Request::post("/").body(()).unwrap();
        svc.clone().oneshot(post).await.unwrap_err();
        // A server hint above `max_retry_after`.
        svc.clone().oneshot(get("/hint")).await.unwrap();
        // The call's deadline comes before the backoff ends.
        let mut req = get("/");
        req.extensions_mut().insert(CallDeadline::new(
            tokio::time::Instant::now() + Duration::from_millis(5),
        ));
        svc.clone().oneshot(req).await.unwrap();
        // A spent budget.
        let none = RetryBudget::builder()
            .ratio(0.0)
            .min_retries_per_sec(0)
            .build()
            .unwrap();
        layer(Some(none))
            .layer(upstream)
            .oneshot(get("/"))
            .await
            .unwrap();
        // Out of retries.
        svc.oneshot(get("/")).await.unwrap();
    });
    for reason in [
        "not_replayable",
        "not_retry_safe",
        "retry_after_too_long",
        "deadline",
        "budget_exhausted",
        "max_retries",
    ] {
        assert_eq!(
            counter(&handle, &gave_up(reason)),
            1,
            "{reason}: {}",
            handle.render()
        );
    }
}

/// A full `MemoryStore` that forgets a response still within its TTL counts it, by
/// what it ran out of; responses that had expired anyway are not counted.
#[test]
fn responses_forgotten_before_their_ttl_are_counted() {
    use postbox::idempotency::{Claim, IdempotencyStore, MemoryStore, StoredResponse};
    use std::time::Duration;
    async fn remember(s: &MemoryStore, key: &str, body: usize, ttl: Duration) {
        let Claim::Proceed(token) = s.claim(key, Duration::from_secs(30)).await.unwrap() else {
            panic!("{key} not claimed");
        };
        let response = StoredResponse {
            status: http::StatusCode::CREATED,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::from(vec![0; body]),
            trailers: None,
            fingerprint: None,
        };
        s.complete(key, token, response, ttl).await.unwrap();
    }
    let day = Duration::from_secs(86_400);
    let handle = recorded(|| async {
        let s = MemoryStore::new(2);
        remember(&s, "short", 1, Duration::from_secs(1)).await;
        tokio::time::advance(Duration::from_secs(2)).await;
        // "short" expired: making room for these forgets nothing alive.
        remember(&s, "a", 1, day).await;
        remember(&s, "b", 1, day).await;
        // Over the capacity of two: "a" goes a day early.
        remember(&s, "c", 1, day).await;
        assert_eq!(s.len(), 2);

        let s = MemoryStore::new(100).max_bytes(1000);
        remember(&s, "x", 500, day).await;
        // Over max_bytes: "x" goes.
        remember(&s, "y", 600, day).await;
        assert!(matches!(
            s.claim("x", day).await.unwrap(),
            Claim::Proceed(_)
        ));
    });
    let forgotten = |reason: &str| {
        counter(
            &handle,
            &format!(r#"postbox_idempotency_forgotten_total{{reason="{reason}"}}"#),
        )
    };
    assert_eq!(forgotten("capacity"), 1);
    assert_eq!(forgotten("bytes"), 1);
}
