//! postbox layers around a real reqwest client talking to a real axum server on
//! loopback.

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
    let app = Router::new()
        .route(
            "/slow",
            post({
                let release = release.clone();
                move || async move {
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
    let client = ReqwestService::new(reqwest::Client::new());

    let first = tokio::spawn(client.clone().oneshot(post_to(addr, "/slow")));
    // Wait until the first request holds the only permit.
    let second = loop {
        let res = client
            .clone()
            .oneshot(post_to(addr, "/slow"))
            .await
            .unwrap();
        if res.status() == http::StatusCode::SERVICE_UNAVAILABLE {
            break res;
        }
        tokio::task::yield_now().await;
    };
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
    // Bind and drop a listener: nothing listens on that port any more.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let client = ReqwestService::new(reqwest::Client::new());
    let err = client.oneshot(post_to(addr, "/orders")).await.unwrap_err();
    let c = Classify::<http::Response<reqwest::Body>, BoxError>::classify(
        &HttpClassifier::new(),
        Err(&err),
    );
    assert_eq!(c.class(), Class::Failure);
    assert!(c.is_retryable());
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
        .service(ReqwestService::new(reqwest::Client::new()));
    let res = client.oneshot(post_to(addr, "/echo")).await.unwrap();
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    let ms: u64 = std::str::from_utf8(&body).unwrap().parse().unwrap();
    assert!((2900..=3000).contains(&ms), "remaining {ms} ms");
}

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
                        Duration::from_secs(10),
                        HttpPropagation::new().with_inbound_headers(),
                    )
                    .unwrap(),
                ),
        );
    let addr = serve(app).await;
    let mut req = post_to(addr, "/hang");
    req.headers_mut()
        .insert(TIMEOUT_MS_HEADER, http::HeaderValue::from_static("50"));
    let res = ReqwestService::new(reqwest::Client::new())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), http::StatusCode::GATEWAY_TIMEOUT);
}
