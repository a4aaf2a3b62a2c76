//! hyper-util's legacy client behind the postbox client stack, against an axum server
//! in the same process on loopback.
//!
//! ```text
//! BufferBody ─► Retry ─► CircuitBreaker ─► Bulkhead ─► AttemptTimeout ─► hyper-util Client
//! ```
//!
//! The client is a `tower::Service` already; the `hyper` feature only teaches the
//! classifiers its error type. The body type is `ReplayBody<Full<Bytes>>`, so a POST with
//! an `Idempotency-Key` can be replayed whole.
//!
//! Run with `cargo run --example hyper_client --features hyper`.

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use postbox::BoxError;
use postbox::bulkhead::BulkheadLayer;
use postbox::circuit_breaker::CircuitBreakerLayer;
use postbox::classify::HttpClassifier;
use postbox::http::body::{BufferBodyLayer, ReplayBody};
use postbox::retry::RetryLayer;
use postbox::retry::backoff::Backoff;
use postbox::timeout::AttemptTimeoutLayer;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    // `/orders` fails its first call with 502; `/slow` takes two seconds.
    let calls = Arc::new(AtomicU32::new(0));
    let app = Router::new()
        .route(
            "/orders",
            post({
                let calls = calls.clone();
                move |body: Bytes| async move {
                    match calls.fetch_add(1, Ordering::SeqCst) {
                        0 => StatusCode::BAD_GATEWAY.into_response(),
                        _ => (StatusCode::CREATED, body).into_response(),
                    }
                }
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "late"
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let hyper = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let client = ServiceBuilder::new()
        .layer(BufferBodyLayer::new(64 * 1024))
        .layer(
            RetryLayer::http()
                .max_retries(2)
                .backoff(Backoff::constant(Duration::from_millis(20)))
                .build()?,
        )
        .layer(
            CircuitBreakerLayer::builder()
                .consecutive_failures(5)
                .build()?
                .with_classifier(HttpClassifier::new()),
        )
        .layer(BulkheadLayer::new(16)?)
        .layer(AttemptTimeoutLayer::new(Duration::from_millis(200))?)
        .service(hyper);

    // A POST is retried because it carries an Idempotency-Key.
    let req = http::Request::post(format!("http://{addr}/orders"))
        .header("idempotency-key", "order-42")
        .body(Full::new(Bytes::from_static(b"{\"sku\":\"tea\"}")))?;
    let res = client.clone().oneshot(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    println!(
        "POST /orders: {status} {body:?} after {} server call(s)",
        calls.load(Ordering::SeqCst)
    );

    // The attempt timeout cuts a slow answer (and the retry tries again: up to 3 attempts).
    let req = http::Request::get(format!("http://{addr}/slow")).body(Full::default())?;
    let err = client.clone().oneshot(req).await.unwrap_err();
    println!("GET /slow: {err}");
    Ok(())
}
