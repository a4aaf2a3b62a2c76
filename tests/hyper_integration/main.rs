//! postbox layers around hyper-util's legacy client talking to a real axum server on
//! loopback.

#[path = "../support/mod.rs"]
mod shared;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use postbox::BoxError;
use postbox::bulkhead::BulkheadLayer;
use postbox::circuit_breaker::error::Open;
use postbox::circuit_breaker::{CircuitBreakerLayer, State};
use postbox::classify::HttpClassifier;
use postbox::error::is_caused_by;
use postbox::http::body::{BufferBodyLayer, ReplayBody};
use postbox::retry::RetryLayer;
use postbox::retry::backoff::Backoff;
use postbox::timeout::AttemptTimeoutLayer;
use postbox::timeout::error::Elapsed;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};

type HyperClient = Client<HttpConnector, ReplayBody<Full<Bytes>>>;

fn hyper_client() -> HyperClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Answers `500` to the first `fail_first` calls of `/flaky`, then `200`; `/slow`
/// answers after 30 seconds (later than any timeout here).
async fn serve(fail_first: u32) -> (SocketAddr, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let app = Router::new()
        .route(
            "/flaky",
            get({
                let calls = calls.clone();
                move || async move {
                    if calls.fetch_add(1, Ordering::SeqCst) < fail_first {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, calls)
}

fn get_req(addr: SocketAddr, path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap()
}

/// The client stack of DESIGN.md (without the deadline) around the hyper client.
fn stack(
    breaker: CircuitBreakerLayer<HttpClassifier>,
    max_retries: u32,
) -> impl tower::Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<hyper::body::Incoming>,
    Error = BoxError,
    Future: Send,
> + Clone {
    // 5 s: far above a loopback answer on a loaded machine (a stalled attempt cut at
    // 200 ms was retried, one call more than the tests count), below `/slow`'s 30 s.
    stack_with(breaker, max_retries, Duration::from_secs(5))
}

/// [`stack`] with an attempt timeout of `attempt`.
fn stack_with(
    breaker: CircuitBreakerLayer<HttpClassifier>,
    max_retries: u32,
    attempt: Duration,
) -> impl tower::Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<hyper::body::Incoming>,
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
                // An open breaker's 30 s hint ends the retries at once.
                .max_retry_after(Duration::from_secs(1))
                .no_budget()
                .build()
                .unwrap(),
        )
        .layer(breaker)
        .layer(BulkheadLayer::new(8).unwrap())
        .layer(AttemptTimeoutLayer::new(attempt).unwrap())
        .service(hyper_client())
}

fn breaker(failures: u32) -> CircuitBreakerLayer<HttpClassifier> {
    CircuitBreakerLayer::builder()
        .consecutive_failures(failures)
        .break_duration(Duration::from_secs(30))
        .build()
        .unwrap()
        .with_classifier(HttpClassifier::new())
}

#[tokio::test]
async fn the_hyper_client_recovers_through_retries() {
    let (addr, calls) = serve(2).await;
    let res = stack(breaker(5), 3)
        .oneshot(get_req(addr, "/flaky"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_dead_port_opens_the_breaker_and_the_retry_stops_at_the_open_breaker() {
    // Held, not listening: a connection is refused, and no other test takes the port.
    let dead = shared::DeadPort::new();
    let addr = dead.addr();
    let breaker = breaker(2);
    let handle = breaker.handle();
    // Refused connections are retried until the breaker opens; its 30 s hint is beyond
    // the retry's 1 s limit, so the open breaker's rejection is the answer.
    let err = stack(breaker, 5)
        .oneshot(get_req(addr, "/flaky"))
        .await
        .unwrap_err();
    assert_eq!(handle.state(), State::Open);
    assert!(is_caused_by::<Open>(&*err), "{err}");
    // Two refused attempts opened it; the third was rejected, and the retry stopped
    // there instead of spending its other retries on the open breaker.
    assert_eq!(handle.metrics().not_permitted(), 1);
}

#[tokio::test]
async fn a_slow_answer_is_cut_by_the_attempt_timeout() {
    let (addr, _) = serve(0).await;
    // No retry, so a slow machine cannot make it count a call more: the attempt is cut
    // whatever else happens, and its error is `Elapsed`.
    let err = stack_with(breaker(5), 0, Duration::from_millis(250))
        .oneshot(get_req(addr, "/slow"))
        .await
        .unwrap_err();
    assert!(is_caused_by::<Elapsed>(&*err), "{err}");
}

#[tokio::test]
async fn the_breaker_classifies_the_bare_hyper_client_errors() {
    // Held, not listening: a connection is refused, and no other test takes the port.
    let dead = shared::DeadPort::new();
    let addr = dead.addr();
    // The breaker sits right on the client: it classifies hyper-util's own error type.
    let breaker = breaker(1);
    let handle = breaker.handle();
    let client = ServiceBuilder::new()
        .layer(breaker)
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let err = client
        .clone()
        .oneshot(get_req(addr, "/"))
        .await
        .unwrap_err();
    assert!(!is_caused_by::<Open>(&*BoxError::from(err)));
    assert_eq!(handle.state(), State::Open);
}
