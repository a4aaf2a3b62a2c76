//! A reqwest client behind the postbox client stack, against an axum server in the
//! same process on loopback.
//!
//! ```text
//! BufferBody ─► Retry ─► CircuitBreaker ─► Bulkhead ─► AttemptTimeout ─► reqwest
//! ```
//!
//! It shows a flaky endpoint recovered by retries, a `503` with `Retry-After: 1`
//! honoured, and the breaker opening on a dead port, then closing again once a server
//! listens there.
//!
//! Run with `cargo run --example reqwest_client`.

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use http::StatusCode;
use postbox::BoxError;
use postbox::bulkhead::BulkheadLayer;
use postbox::circuit_breaker::CircuitBreakerLayer;
use postbox::classify::HttpClassifier;
use postbox::http::body::BufferBodyLayer;
use postbox::http::reqwest::ReqwestService;
use postbox::retry::RetryLayer;
use postbox::retry::backoff::Backoff;
use postbox::timeout::AttemptTimeoutLayer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

/// `/flaky`: `500` twice, then `200`. `/busy`: `503` with `Retry-After: 1` once, then `200`.
fn app() -> Router {
    let flaky = Arc::new(AtomicU32::new(0));
    let busy = Arc::new(AtomicU32::new(0));
    Router::new()
        .route(
            "/flaky",
            get(move || async move {
                match flaky.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    _ => "flaky: ok".into_response(),
                }
            }),
        )
        .route(
            "/busy",
            get(move || async move {
                match busy.fetch_add(1, Ordering::SeqCst) {
                    0 => (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")]).into_response(),
                    _ => "busy: ok".into_response(),
                }
            }),
        )
}

fn get_req(addr: SocketAddr, path: &str) -> http::Request<String> {
    http::Request::get(format!("http://{addr}{path}"))
        .body(String::new())
        .expect("a valid request")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app()).await });

    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .break_duration(Duration::from_millis(300))
        .permitted_probes(1) // one successful probe closes it
        .build()?
        .with_classifier(HttpClassifier::new());
    let handle = breaker.handle();
    let client = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024))
        .layer(
            RetryLayer::http()
                .max_retries(3) // up to 4 attempts
                .backoff(Backoff::exponential(Duration::from_millis(20)))
                .max_retry_after(Duration::from_secs(2))
                .build()?,
        )
        .layer(breaker)
        .layer(BulkheadLayer::new(32)?)
        .layer(AttemptTimeoutLayer::new(Duration::from_secs(1))?)
        .service(ReqwestService::new(
            // Loopback only, whatever `HTTP_PROXY` says.
            reqwest::Client::builder().no_proxy().build()?,
        ));

    for path in ["/flaky", "/busy"] {
        let started = Instant::now();
        let res = client.clone().oneshot(get_req(addr, path)).await?;
        println!("{path:>8}: {} after {:?}", res.status(), started.elapsed());
    }

    // A dead port: refused connections (retried: they never reached a server) open the
    // breaker; later calls are rejected at once until a server comes up.
    let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let err = client
        .clone()
        .oneshot(get_req(dead, "/flaky"))
        .await
        .unwrap_err();
    println!("dead port: {err} — breaker {:?}", handle.state());
    let listener = TcpListener::bind(dead).await?;
    let up = Router::new().route("/up", get(|| async { "up" }));
    tokio::spawn(async move { axum::serve(listener, up).await });
    tokio::time::sleep(Duration::from_millis(350)).await;
    let res = client.clone().oneshot(get_req(dead, "/up")).await?;
    println!("server up: {} — breaker {:?}", res.status(), handle.state());
    Ok(())
}
