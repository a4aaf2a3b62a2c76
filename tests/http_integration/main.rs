//! postbox layers around a real reqwest client talking to a real axum server on
//! loopback.

#[path = "../support/mod.rs"]
mod shared;

use axum::Router;
use axum::routing::post;
use postbox::BoxError;
use postbox::bulkhead::BulkheadLayer;
use postbox::classify::{Class, Classify, HttpClassifier};
use postbox::http::ErrorResponseLayer;
use postbox::http::reqwest::ReqwestService;
use postbox::timeout::{DeadlineLayer, HttpPropagation, TIMEOUT_MS_HEADER};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::{ServiceBuilder, ServiceExt};

async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn post_to(addr: SocketAddr, path: &str) -> http::Request<String> {
    http::Request::post(format!("http://{addr}{path}"))
        .body(String::from("{}"))
        .unwrap()
}

#[tokio::test]
async fn a_full_server_bulkhead_answers_503_with_retry_after() {
    let release = Arc::new(Notify::new());
    let entered = Arc::new(Notify::new());
    let app = Router::new()
        .route(
            "/slow",
            post({
                let (release, entered) = (release.clone(), entered.clone());
                move || async move {
                    entered.notify_one();
                    release.notified().await;
                    "done"
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(ErrorResponseLayer::new())
                .layer(BulkheadLayer::new(1).unwrap()),
        );
    let addr = serve(app).await;
    let client = ReqwestService::new(reqwest::Client::builder().no_proxy().build().unwrap());

    let first = tokio::spawn(client.clone().oneshot(post_to(addr, "/slow")));
    // The first request holds the only permit (its handler runs).
    entered.notified().await;
    let second = client
        .clone()
        .oneshot(post_to(addr, "/slow"))
        .await
        .unwrap();
    assert_eq!(second.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.headers()[http::header::RETRY_AFTER], "1");
    let c = Classify::<_, BoxError>::classify(&HttpClassifier::new(), Ok(&second));
    assert_eq!(c.class(), Class::Overload);
    assert_eq!(c.retry_after(), Some(Duration::from_secs(1)));

    release.notify_waiters();
    release.notify_one();
    assert_eq!(first.await.unwrap().unwrap().status(), http::StatusCode::OK);
}

#[tokio::test]
async fn a_refused_connection_is_a_retryable_failure_that_never_took_effect() {
    // Held, not listening: a connection is refused, and no other test takes the port.
    let dead = shared::DeadPort::new();
    let addr = dead.addr();
    let client = ReqwestService::new(reqwest::Client::builder().no_proxy().build().unwrap());
    let err = client.oneshot(post_to(addr, "/orders")).await.unwrap_err();
    let c = Classify::<http::Response<reqwest::Body>, BoxError>::classify(
        &HttpClassifier::new(),
        Err(&err),
    );
    assert_eq!(c.class(), Class::Failure);
    assert!(c.is_retryable());
    assert!(!c.may_have_taken_effect());
}

/// reqwest prints an error with its URL (`… for url (…)`), which the enqueue fallback
/// logs and the replayer stores as a dead letter's reason: its userinfo and the values
/// of credential-like query parameters are redacted; the rest of it stays.
#[tokio::test]
async fn an_errors_url_has_its_credentials_redacted() {
    let dead = shared::DeadPort::new();
    let addr = dead.addr();
    let client = ReqwestService::new(reqwest::Client::builder().no_proxy().build().unwrap());
    let req = http::Request::post(format!(
        "http://user:pw-111@{addr}/orders?page=2&api_key=ak-222&X-Amz-Signature=sg-333;token=tk-444"
    ))
    .body(String::from("{}"))
    .unwrap();
    let err = client.clone().oneshot(req).await.unwrap_err();
    let shown = format!("{err} {err:?}");
    for secret in ["pw-111", "ak-222", "sg-333", "tk-444"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    assert!(
        shown.contains("/orders?page=2&api_key=redacted&X-Amz-Signature=redacted;token=redacted"),
        "{shown}"
    );
    // A credential only after a `;` is found too.
    let req = http::Request::post(format!("http://{addr}/orders?page=2;token=tk-555"))
        .body(String::from("{}"))
        .unwrap();
    let err = client.oneshot(req).await.unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("tk-555"), "{shown}");
}

/// A request reqwest refuses to build (a scheme it does not speak) is the caller's
/// mistake: never sent, not retried, and no breaker counts it against the dependency.
#[tokio::test]
async fn a_request_reqwest_cannot_build_is_ignored_not_a_failure() {
    let client = ReqwestService::new(reqwest::Client::builder().no_proxy().build().unwrap());
    let req = http::Request::post("ftp://127.0.0.1:9/orders")
        .body(String::from("{}"))
        .unwrap();
    let err = client.oneshot(req).await.unwrap_err();
    let c = Classify::<http::Response<reqwest::Body>, BoxError>::classify(
        &HttpClassifier::new(),
        Err(&err),
    );
    assert_eq!(c.class(), Class::Ignored, "{err}");
    assert!(!c.is_retryable());
    assert!(!c.may_have_taken_effect());
}

#[tokio::test]
async fn the_deadline_reaches_the_next_hop_as_a_header() {
    let app = Router::new().route(
        "/echo",
        post(|headers: http::HeaderMap| async move {
            headers
                .get(TIMEOUT_MS_HEADER)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        }),
    );
    let addr = serve(app).await;
    let client = ServiceBuilder::new()
        .layer(
            DeadlineLayer::with_propagation(Duration::from_secs(3), HttpPropagation::new())
                .unwrap(),
        )
        .service(ReqwestService::new(
            reqwest::Client::builder().no_proxy().build().unwrap(),
        ));
    let res = client.oneshot(post_to(addr, "/echo")).await.unwrap();
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    let ms: u64 = std::str::from_utf8(&body).unwrap().parse().unwrap();
    // What is left of the 3 s (never more), not a fixed slack a loaded machine could miss.
    assert!((1..=3000).contains(&ms), "remaining {ms} ms");
}

/// The caller's `postbox-timeout-ms` (50 ms) is the server's deadline when it is the
/// sooner: a handler running past it is answered `504` then. (The server's own budget,
/// 60 s, outlasts the 30 s handler, so only the header can give that `504`.)
#[tokio::test]
async fn a_server_deadline_answers_504() {
    let app = Router::new()
        .route(
            "/hang",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(ErrorResponseLayer::new())
                .layer(
                    DeadlineLayer::with_propagation(
                        Duration::from_secs(60),
                        HttpPropagation::new().with_inbound_headers(),
                    )
                    .unwrap(),
                ),
        );
    let addr = serve(app).await;
    let mut req = post_to(addr, "/hang");
    req.headers_mut()
        .insert(TIMEOUT_MS_HEADER, http::HeaderValue::from_static("50"));
    let start = tokio::time::Instant::now();
    let res = ReqwestService::new(reqwest::Client::builder().no_proxy().build().unwrap())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), http::StatusCode::GATEWAY_TIMEOUT);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

// === the client stack around reqwest ===

/// Credentials in the URL reach the server as `Authorization: Basic`, percent-decoded,
/// and leave the URL, as with reqwest's own `RequestBuilder`; a header the caller set
/// wins. (Through `ReqwestService` they stayed in the URL: the server got no
/// credentials, and a forward proxy got them in the request line.)
#[tokio::test]
async fn credentials_in_the_url_are_sent_as_basic_auth() {
    let app = Router::new().route(
        "/echo",
        axum::routing::get(|headers: http::HeaderMap| async move {
            headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        }),
    );
    let addr = serve(app).await;
    let client = ReqwestService::new(reqwest::Client::builder().no_proxy().build().unwrap());
    let sent = |uri: String, header: Option<&'static str>| {
        let client = client.clone();
        async move {
            let mut req = http::Request::get(uri);
            if let Some(h) = header {
                req = req.header(http::header::AUTHORIZATION, h);
            }
            let res = client
                .oneshot(req.body(String::new()).unwrap())
                .await
                .unwrap();
            let body = http_body_util::BodyExt::collect(res.into_body())
                .await
                .unwrap();
            String::from_utf8(body.to_bytes().to_vec()).unwrap()
        }
    };
    // base64("u@x:p w") = "dUB4OnAgdw=="
    assert_eq!(
        sent(format!("http://u%40x:p%20w@{addr}/echo"), None).await,
        "Basic dUB4OnAgdw=="
    );
    assert_eq!(
        sent(format!("http://u:p@{addr}/echo"), Some("Bearer t")).await,
        "Bearer t"
    );
}

mod client_stack {
    use super::*;
    use axum::routing::get;
    use postbox::circuit_breaker::error::Open;
    use postbox::circuit_breaker::{CircuitBreakerLayer, State};
    use postbox::error::is_caused_by;
    use postbox::http::body::BufferBodyLayer;
    use postbox::retry::RetryLayer;
    use postbox::retry::backoff::Backoff;
    use postbox::timeout::AttemptTimeoutLayer;
    use std::sync::atomic::{AtomicU32, Ordering};

    type Req = http::Request<String>;

    /// BufferBody → Retry → CircuitBreaker → Bulkhead → AttemptTimeout → reqwest.
    fn stack(
        breaker: CircuitBreakerLayer<HttpClassifier>,
        max_retries: u32,
    ) -> impl tower::Service<
        Req,
        Response = http::Response<reqwest::Body>,
        Error = BoxError,
        Future: Send,
    > + Clone {
        ServiceBuilder::new()
            .map_err(BoxError::from)
            .layer(BufferBodyLayer::new(64 * 1024))
            .layer(
                RetryLayer::http()
                    .max_retries(max_retries)
                    .backoff(Backoff::constant(Duration::from_millis(10)))
                    .max_retry_after(Duration::from_secs(2))
                    .no_budget()
                    .build()
                    .unwrap(),
            )
            .layer(breaker)
            .layer(BulkheadLayer::new(8).unwrap())
            // 5 s: far above a loopback answer on a loaded machine (an attempt cut
            // is retried, one call more than the tests count).
            .layer(AttemptTimeoutLayer::new(Duration::from_secs(5)).unwrap())
            .service(ReqwestService::new(
                reqwest::Client::builder().no_proxy().build().unwrap(),
            ))
    }

    fn breaker(failures: u32, break_for: Duration) -> CircuitBreakerLayer<HttpClassifier> {
        CircuitBreakerLayer::builder()
            .consecutive_failures(failures)
            .break_duration(break_for)
            .permitted_probes(1)
            .build()
            .unwrap()
            .with_classifier(HttpClassifier::new())
    }

    fn get_from(addr: SocketAddr, path: &str) -> Req {
        http::Request::get(format!("http://{addr}{path}"))
            .body(String::new())
            .unwrap()
    }

    /// A `POST` answered `303` to a host that refuses connections (reqwest follows it as a
    /// `GET`, its default) fails with an error that may have taken effect, and is not
    /// sent again: the server took it once. (The next hop's refused connection read as
    /// a request never sent, and each retry made another order.)
    #[tokio::test]
    async fn a_post_redirected_to_a_dead_host_is_not_sent_again() {
        let dead = shared::DeadPort::new();
        let gone = dead.addr();
        let hits = Arc::new(AtomicU32::new(0));
        let app = Router::new().route(
            "/orders",
            post({
                let hits = hits.clone();
                move || async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    (
                        http::StatusCode::SEE_OTHER,
                        [(http::header::LOCATION, format!("http://{gone}/orders/1"))],
                    )
                }
            }),
        );
        let addr = serve(app).await;
        let err = stack(breaker(10, Duration::from_secs(30)), 3)
            .oneshot(post_to(addr, "/orders"))
            .await
            .unwrap_err();
        assert_eq!(hits.load(Ordering::SeqCst), 1, "sent again: {err}");
        let c = Classify::<http::Response<reqwest::Body>, BoxError>::classify(
            &HttpClassifier::new(),
            Err(&err),
        );
        assert!(c.may_have_taken_effect());
        assert!(is_caused_by::<reqwest::Error>(&*err));
    }

    /// A caller's upload that breaks after reqwest began to send it stays the caller's
    /// failure (ignored, not retried, not counted by a breaker) though it failed after
    /// sending: only "never sent" is ruled out.
    #[tokio::test]
    async fn a_broken_upload_through_reqwest_is_still_the_callers() {
        use bytes::Bytes;
        use http_body::Frame;
        use std::pin::Pin;
        use std::task::{Context, Poll};

        /// One frame, then an error.
        struct Breaks(bool);
        impl http_body::Body for Breaks {
            type Data = Bytes;
            type Error = std::io::Error;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
                if std::mem::replace(&mut self.0, true) {
                    Poll::Ready(Some(Err(std::io::ErrorKind::ConnectionReset.into())))
                } else {
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 64])))))
                }
            }
        }

        let app = Router::new().route("/upload", post(|body: String| async move { body }));
        let addr = serve(app).await;
        let svc = ServiceBuilder::new()
            .layer(BufferBodyLayer::new(16))
            .service(ReqwestService::new(
                reqwest::Client::builder().no_proxy().build().unwrap(),
            ));
        let req = http::Request::post(format!("http://{addr}/upload"))
            .body(Breaks(false))
            .unwrap();
        let err: BoxError = svc.oneshot(req).await.unwrap_err();
        let c = Classify::<http::Response<reqwest::Body>, BoxError>::classify(
            &HttpClassifier::new(),
            Err(&err),
        );
        assert_eq!(c.class(), Class::Ignored, "{err:?}");
        assert!(!c.is_retryable());
    }

    /// `/flaky` answers `first` to the first `n` calls, then `200`; returns the call count.
    async fn flaky(
        n: u32,
        first: fn() -> axum::response::Response,
    ) -> (SocketAddr, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        let app = Router::new().route(
            "/flaky",
            get({
                let calls = calls.clone();
                move || async move {
                    if calls.fetch_add(1, Ordering::SeqCst) < n {
                        first()
                    } else {
                        axum::response::IntoResponse::into_response("ok")
                    }
                }
            }),
        );
        (serve(app).await, calls)
    }

    #[tokio::test]
    async fn reqwest_recovers_from_a_server_that_fails_three_times() {
        let (addr, calls) = flaky(3, || {
            axum::response::IntoResponse::into_response(http::StatusCode::INTERNAL_SERVER_ERROR)
        })
        .await;
        let breaker = breaker(5, Duration::from_secs(30));
        let handle = breaker.handle();
        let res = stack(breaker, 3)
            .oneshot(get_from(addr, "/flaky"))
            .await
            .unwrap();
        assert_eq!(res.status(), http::StatusCode::OK);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "three failures, then success"
        );
        assert_eq!(handle.state(), State::Closed);
    }

    #[tokio::test]
    async fn a_503_with_retry_after_1_is_honoured() {
        let (addr, calls) = flaky(1, || {
            axum::response::IntoResponse::into_response((
                http::StatusCode::SERVICE_UNAVAILABLE,
                [(http::header::RETRY_AFTER, "1")],
            ))
        })
        .await;
        let started = tokio::time::Instant::now();
        let res = stack(breaker(5, Duration::from_secs(30)), 3)
            .oneshot(get_from(addr, "/flaky"))
            .await
            .unwrap();
        let waited = started.elapsed();
        assert_eq!(res.status(), http::StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    }

    #[tokio::test]
    async fn the_breaker_opens_on_a_dead_port_and_recovers_when_a_server_comes_up() {
        // Held, not listening: a connection is refused, and no other test takes the port.
        let dead = shared::DeadPort::new();
        let addr = dead.addr();
        // Long enough that the third call meets it open however slow the machine.
        let breaker = breaker(2, Duration::from_secs(5));
        let handle = breaker.handle();
        // No retries: each call is one attempt.
        let client = stack(breaker, 0);

        for _ in 0..2 {
            let err = client
                .clone()
                .oneshot(get_from(addr, "/up"))
                .await
                .unwrap_err();
            assert!(!is_caused_by::<Open>(&*err), "{err}");
        }
        assert_eq!(handle.state(), State::Open);
        let err = client
            .clone()
            .oneshot(get_from(addr, "/up"))
            .await
            .unwrap_err();
        assert!(is_caused_by::<Open>(&*err), "{err}");

        // The dependency comes up on the same port.
        let listener = dead.listen();
        let app = Router::new().route("/up", get(|| async { "up" }));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        // After the break the next call probes, succeeds and closes the breaker.
        tokio::time::sleep(Duration::from_millis(5100)).await;
        let res = client.clone().oneshot(get_from(addr, "/up")).await.unwrap();
        assert_eq!(res.status(), http::StatusCode::OK);
        assert_eq!(handle.state(), State::Closed);
    }
}
