//! An axum server behind the server stack, whose handler calls a downstream through the
//! client stack and answers `202 Accepted` when the call was deferred to the queue; the
//! metrics on `/metrics` (Prometheus text format).
//!
//! Everything comes from `examples/config/axum_server.toml`. The example runs on
//! loopback, drives a few requests, prints what happened and a snippet of `/metrics`,
//! and exits.
//!
//! `cargo run --example axum_server`

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::Full;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use postbox::BoxError;
use postbox::config::{DeferringClient, StackConfig};
use postbox::enqueue::{DEFER_REASON_HEADER, MESSAGE_ID_HEADER};
use postbox::http::reqwest::ReqwestService;
use postbox::queue::{EmbeddedOptions, EmbeddedQueue, Queue};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};

type Inventory = DeferringClient<ReqwestService, EmbeddedQueue>;

#[derive(Clone)]
struct AppState {
    inventory: Inventory,
    /// Where the inventory service is (switched to a dead port half-way through).
    inventory_url: Arc<RwLock<String>>,
}

/// Reserves stock downstream: the downstream's status, or `202 Accepted` with the
/// message id when the call was deferred.
async fn create_order(State(app): State<AppState>, body: Bytes) -> Response {
    let url = app.inventory_url.read().unwrap().clone();
    let req = http::Request::post(url).body(Full::new(body)).unwrap();
    match app.inventory.oneshot(req).await {
        Ok(res) if res.headers().contains_key(MESSAGE_ID_HEADER) => {
            let id = res.headers()[MESSAGE_ID_HEADER].clone();
            let reason = res.headers()[DEFER_REASON_HEADER].clone();
            (
                StatusCode::ACCEPTED,
                [(MESSAGE_ID_HEADER, id), (DEFER_REASON_HEADER, reason)],
                "accepted: the reservation is stored, to be delivered when inventory is back (this example runs no replayer)\n",
            )
                .into_response()
        }
        Ok(res) if res.status().is_success() => (res.status(), "reserved\n").into_response(),
        // An answer not deferred (a 4xx: the request itself was refused): passed on.
        Ok(res) => (res.status(), "not reserved\n").into_response(),
        // Errors the fallback does not defer: their HTTP mapping (503, 504, 500).
        Err(e) => postbox::error::into_response(e),
    }
}

async fn slow() -> &'static str {
    tokio::time::sleep(Duration::from_millis(300)).await;
    "slow done\n"
}

async fn metrics(State(handle): State<PrometheusHandle>) -> String {
    handle.render()
}

async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn show(label: &str, res: reqwest::Response) {
    let status = res.status();
    let retry_after = res.headers().get("retry-after").cloned();
    let reason = res.headers().get(DEFER_REASON_HEADER).cloned();
    let body = res.text().await.unwrap_or_default();
    let mut extra = String::new();
    if let Some(r) = retry_after {
        extra += &format!(" retry-after={}", r.to_str().unwrap_or("?"));
    }
    if let Some(r) = reason {
        extra += &format!(" deferred because {}", r.to_str().unwrap_or("?"));
    }
    println!("{label:<34} -> {status}{extra}: {}", body.trim());
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Metrics: a Prometheus recorder, rendered on GET /metrics.
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/config/axum_server.toml"
    );
    let config = StackConfig::load(path)?;
    println!("config: {path}");

    // The downstream: an inventory service on loopback.
    let inventory_addr = serve(Router::new().route(
        "/reserve",
        post(|| async { (StatusCode::CREATED, "reserved") }),
    ))
    .await;

    // The client stack to it, behind the enqueue fallback and its durable queue.
    let dir = tempfile::tempdir()?;
    let queue = Arc::new(EmbeddedQueue::open(
        dir.path().join("postbox.redb"),
        EmbeddedOptions::new(),
    )?);
    let inventory = ServiceBuilder::new()
        .layer(config.client.deferring_layer(queue.clone())?)
        // No system proxy: the calls go to loopback whatever `HTTP_PROXY` says.
        .service(ReqwestService::new(
            reqwest::Client::builder().no_proxy().build()?,
        ));
    let state = AppState {
        inventory,
        inventory_url: Arc::new(RwLock::new(format!("http://{inventory_addr}/reserve"))),
    };

    // The server: the server stack on the API routes; /metrics outside it.
    let app = Router::new()
        .route("/orders", post(create_order))
        .with_state(state.clone())
        .route("/slow", get(slow))
        .layer(config.server.layer()?)
        .merge(
            Router::new()
                .route("/metrics", get(metrics))
                .with_state(prometheus.clone()),
        );
    let addr = serve(app).await;
    println!("listening on http://{addr}\n");
    let http = reqwest::Client::builder().no_proxy().build()?;
    let order = || {
        http.post(format!("http://{addr}/orders"))
            .body("{\"sku\":42,\"qty\":1}")
            .send()
    };

    // 1. Inventory is up: the order is reserved synchronously.
    show("POST /orders (inventory up)", order().await?).await;

    // 2. Inventory goes down (a port nobody listens on): orders are deferred.
    let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    *state.inventory_url.write().unwrap() = format!("http://{dead}/reserve");
    for i in 1..=3 {
        show(
            &format!("POST /orders (inventory down) #{i}"),
            order().await?,
        )
        .await;
    }
    println!("queued for later delivery: {:?}", queue.depth().await?);

    // 3. More concurrent requests than the server bulkhead admits: fail fast with 503.
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(http.get(format!("http://{addr}/slow")).send()))
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        show(&format!("GET /slow #{}", i + 1), call.await??).await;
    }

    // 4. The metrics, as Prometheus scrapes them.
    let body = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    println!("\nGET /metrics (postbox_* samples):");
    for line in body.lines().filter(|l| l.starts_with("postbox_")) {
        println!("  {line}");
    }
    Ok(())
}
