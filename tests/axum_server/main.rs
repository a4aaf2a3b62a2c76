//! The server stack on a real axum server, and a handler calling a downstream through
//! the client stack, with a real reqwest client, all on loopback.

#[path = "../support/mod.rs"]
mod shared;

use self::shared::sample;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::Full;
use postbox::config::{DeferringClient, Format, StackConfig};
use postbox::enqueue::{DEFER_REASON_HEADER, MESSAGE_ID_HEADER};
use postbox::http::reqwest::ReqwestService;
use postbox::queue::{MemoryQueue, Queue};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::ServiceExt;

async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

const CONFIG: &str = r#"
[server]
preset = "server"
deadline = "5s"

[server.bulkhead]
max_concurrent = 1

[client]
preset = "standard_http_client"
deadline = "2s"
attempt_timeout = "1s"

[client.retry]
max_retries = 2

[client.retry.backoff]
base = "10ms"
max_delay = "50ms"

[client.enqueue]
enabled = true
"#;

#[tokio::test]
async fn a_full_bulkhead_answers_503_with_retry_after() {
    let config = StackConfig::from_str(CONFIG, Format::Toml).unwrap();
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
        .layer(config.server.layer().unwrap());
    let addr = serve(app).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{addr}/slow");

    let first = tokio::spawn(http.post(&url).body("{}").send());
    entered.notified().await; // the first request holds the only permit

    let second = http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.headers()["retry-after"], "1");
    assert!(second.text().await.unwrap().contains("bulkhead full"));

    release.notify_one();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.text().await.unwrap(), "done");
}

type Downstream = DeferringClient<ReqwestService, MemoryQueue>;

#[derive(Clone)]
struct AppState {
    downstream: Downstream,
    url: String,
}

/// Forwards the order downstream; `202 Accepted` with the message id when the call was
/// deferred, the downstream's status otherwise.
async fn create_order(State(app): State<AppState>, body: Bytes) -> Response {
    let req = http::Request::post(&app.url).body(Full::new(body)).unwrap();
    match app.downstream.oneshot(req).await {
        Ok(res) if res.headers().contains_key(MESSAGE_ID_HEADER) => {
            let id = res.headers()[MESSAGE_ID_HEADER].clone();
            let reason = res.headers()[DEFER_REASON_HEADER].clone();
            (
                StatusCode::ACCEPTED,
                [(MESSAGE_ID_HEADER, id), (DEFER_REASON_HEADER, reason)],
                "order accepted; it will be delivered later",
            )
                .into_response()
        }
        Ok(res) => res.status().into_response(),
        Err(e) => postbox::error::into_response(e),
    }
}

#[tokio::test]
async fn a_dead_downstream_is_answered_202_through_the_enqueue_fallback() {
    let config = StackConfig::from_str(CONFIG, Format::Toml).unwrap();
    let queue = Arc::new(MemoryQueue::new());
    let downstream = tower::ServiceBuilder::new()
        .layer(config.client.deferring_layer(queue.clone()).unwrap())
        .service(ReqwestService::new(
            reqwest::Client::builder().no_proxy().build().unwrap(),
        ));
    let dead_port = shared::DeadPort::new();
    let dead = dead_port.addr();
    let state = AppState {
        downstream,
        url: format!("http://{dead}/orders"),
    };
    let app = Router::new()
        .route("/orders", post(create_order))
        .with_state(state)
        .layer(config.server.layer().unwrap());
    let addr = serve(app).await;

    let res = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("http://{addr}/orders"))
        .body("{\"sku\":42}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(res.headers()[DEFER_REASON_HEADER], "retries-exhausted");
    let id = res.headers()[MESSAGE_ID_HEADER]
        .to_str()
        .unwrap()
        .to_owned();

    let depth = queue.depth().await.unwrap();
    assert_eq!(depth.pending, 1);
    let stored = queue
        .lease(1, Duration::from_secs(30), std::time::SystemTime::now())
        .await
        .unwrap();
    assert_eq!(stored[0].envelope.id.to_string(), id);
    assert_eq!(&stored[0].envelope.body[..], b"{\"sku\":42}");
}

#[tokio::test] // current-thread: the thread-local recorder sees the server's tasks too
async fn the_layers_report_under_one_metrics_scheme() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let config = StackConfig::from_str(CONFIG, Format::Toml).unwrap();
    let queue = Arc::new(MemoryQueue::new());
    let downstream = tower::ServiceBuilder::new()
        .layer(config.client.deferring_layer(queue.clone()).unwrap())
        .service(ReqwestService::new(
            reqwest::Client::builder().no_proxy().build().unwrap(),
        ));
    let release = Arc::new(Notify::new());
    let entered = Arc::new(Notify::new());
    let dead_port = shared::DeadPort::new();
    let state = AppState {
        downstream,
        url: format!("http://{}/orders", dead_port.addr()),
    };
    let app = Router::new()
        .route("/orders", post(create_order))
        .with_state(state)
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
        .layer(config.server.layer().unwrap());
    let addr = serve(app).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    let res = http
        .post(format!("http://{addr}/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let first = tokio::spawn(http.post(format!("http://{addr}/slow")).send());
    entered.notified().await;
    let res = http
        .post(format!("http://{addr}/slow"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    release.notify_one();
    first.await.unwrap().unwrap();

    let render = handle.render();
    let calls = "postbox_calls_total";
    assert_eq!(
        sample(
            &render,
            calls,
            &[r#"layer="bulkhead""#, r#"outcome="rejected""#]
        ),
        Some(1.0),
        "{render}"
    );
    assert_eq!(
        sample(
            &render,
            calls,
            &[
                r#"layer="enqueue""#,
                r#"outcome="enqueued""#,
                r#"reason="retries-exhausted""#
            ]
        ),
        Some(1.0),
        "{render}"
    );
    // Connection refused three times: the first attempt and two retries.
    assert_eq!(
        sample(&render, "postbox_retry_attempts_total", &[]),
        Some(3.0)
    );
    assert_eq!(sample(&render, "postbox_retries_total", &[]), Some(2.0));
}

#[tokio::test]
async fn the_server_stack_honours_the_callers_deadline_and_replays_duplicates() {
    let config = StackConfig::from_str(CONFIG, Format::Toml).unwrap();
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .route(
            "/orders",
            post({
                let runs = runs.clone();
                move || async move {
                    let n = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    (StatusCode::CREATED, format!("order #{n}"))
                }
            }),
        )
        .layer(config.server.layer().unwrap());
    let addr = serve(app).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    // The caller has 50 ms left: the server gives up then, not after its own 5 s.
    let started = tokio::time::Instant::now();
    let res = http
        .post(format!("http://{addr}/slow"))
        .header(postbox::timeout::TIMEOUT_MS_HEADER, "50")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    // The caller's 50 ms, not the server's own 5 s (the 504 names the budget).
    // (An answer before the server's own 5 s was cut by the caller's deadline.)
    assert!(started.elapsed() < Duration::from_secs(4));
    let text = res.text().await.unwrap();
    assert!(text.contains("50ms"), "{text}");

    // The same idempotency key twice: the handler runs once, the second is replayed.
    let post_order = || {
        http.post(format!("http://{addr}/orders"))
            .header("idempotency-key", "order-42")
            .send()
    };
    let first = post_order().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(first.text().await.unwrap(), "order #1");
    let again = post_order().await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(
        again.headers()[postbox::idempotency::REPLAYED_HEADER],
        "true"
    );
    assert_eq!(again.text().await.unwrap(), "order #1");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_open_breaker_defers_at_once_and_only_for_its_authority() {
    let config = StackConfig::from_str(
        r#"
[client]
preset = "standard_http_client"
deadline = "2s"
attempt_timeout = "1s"

[client.retry.backoff]
base = "10ms"
max_delay = "50ms"

[client.circuit_breaker]
minimum_calls = 3
break_duration = "30s"

[client.enqueue]
enabled = true
"#,
        Format::Toml,
    )
    .unwrap();
    let queue = Arc::new(MemoryQueue::new());
    let stack = config.client.deferring_layer(queue.clone()).unwrap();
    let breakers = stack.client().breakers();
    let client = tower::ServiceBuilder::new()
        .layer(stack)
        .service(ReqwestService::new(
            reqwest::Client::builder().no_proxy().build().unwrap(),
        ));
    let dead_port = shared::DeadPort::new();
    let dead = dead_port.addr();
    let live = serve(Router::new().route("/orders", post(|| async { StatusCode::CREATED }))).await;
    let order = |addr: SocketAddr| {
        http::Request::post(format!("http://{addr}/orders"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };

    // Refused connections open the dead authority's breaker …
    let res = client.clone().oneshot(order(dead)).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let dead_breaker = breakers.get(&dead.to_string().parse().unwrap()).unwrap();
    assert_eq!(dead_breaker.state(), postbox::circuit_breaker::State::Open);

    // … so the next call is deferred at once: the breaker's 30 s hint is longer than the
    // deadline (the stack caps `max_retry_after` there), so the retry gives up at the
    // first rejection instead of waiting and trying again.
    let rejected = dead_breaker.metrics().not_permitted();
    let res = client.clone().oneshot(order(dead)).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(res.headers()[DEFER_REASON_HEADER], "circuit-open");
    assert_eq!(dead_breaker.metrics().not_permitted(), rejected + 1);

    // Another authority has its own, closed, breaker.
    let res = client.clone().oneshot(order(live)).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(queue.depth().await.unwrap().pending, 2);
}

/// Behind the enqueue fallback, which holds a request's whole body (up to its
/// `max_body`) anyway, a body over `buffer_body` is still replayed by the retry: a
/// smaller `buffer_body` does not turn the retries of every larger request off and defer
/// it after its first failure.
#[tokio::test]
async fn behind_the_fallback_a_body_over_buffer_body_is_still_retried() {
    let config = StackConfig::from_str(
        r#"
[client]
preset = "standard_http_client"
buffer_body = 16

[client.retry.backoff]
base = "10ms"
jitter = "none"

[client.enqueue]
enabled = true
"#,
        Format::Toml,
    )
    .unwrap();
    let queue = Arc::new(MemoryQueue::new());
    let client = tower::ServiceBuilder::new()
        .layer(config.client.deferring_layer(queue.clone()).unwrap())
        .service(ReqwestService::new(
            reqwest::Client::builder().no_proxy().build().unwrap(),
        ));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let lengths = Arc::new(std::sync::Mutex::new(Vec::new()));
    let flaky = serve(Router::new().route(
        "/orders",
        post({
            let calls = calls.clone();
            let lengths = lengths.clone();
            move |body: Bytes| async move {
                // Checked below, in the test's task: a failed assertion here would only
                // reset the connection.
                lengths.lock().unwrap().push(body.len());
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::CREATED
                }
            }
        }),
    ))
    .await;
    let req = http::Request::post(format!("http://{flaky}/orders"))
        .header("idempotency-key", "order-7")
        .body(Full::new(Bytes::from(vec![b'x'; 1024])))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(
        *lengths.lock().unwrap(),
        [1024, 1024],
        "the whole body, every attempt"
    );
    assert_eq!(queue.depth().await.unwrap().pending, 0);
}
