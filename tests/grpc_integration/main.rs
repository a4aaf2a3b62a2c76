//! postbox layers around a real tonic `Channel` talking to a real tonic server on
//! loopback.

#[path = "../support/mod.rs"]
mod shared;

mod echo;

use echo::{Reply, channel, say, say_keyed, serve, serve_idempotent};
use postbox::BoxError;
use postbox::bulkhead::BulkheadLayer;
use postbox::circuit_breaker::{CircuitBreakerLayer, State};
use postbox::classify::GrpcClassifier;
use postbox::classify::grpc::GrpcCode;
use postbox::grpc::{GrpcOutcome, GrpcRequests, GrpcStatusLayer, IntoStatusLayer};
use postbox::http::body::{BufferBodyLayer, ReplayBody};
use postbox::retry::RetryLayer;
use postbox::retry::backoff::Backoff;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::Code;
use tower::ServiceBuilder;

fn breaker(failures: u32) -> CircuitBreakerLayer<GrpcClassifier> {
    CircuitBreakerLayer::builder()
        .consecutive_failures(failures)
        .break_duration(Duration::from_secs(30))
        .build()
        .unwrap()
        .with_classifier(GrpcClassifier::new())
}

/// The retrying stack: `Say` is safe to repeat.
fn retrying(
    addr: std::net::SocketAddr,
) -> impl tonic::client::GrpcService<
    tonic::body::Body,
    Error = tonic::Status,
    ResponseBody: http_body::Body<Data = bytes::Bytes, Error = BoxError> + Send + 'static,
> + Clone {
    retrying_with(addr, GrpcRequests::new().idempotent("/echo.Echo/Say"))
}

fn retrying_with(
    addr: std::net::SocketAddr,
    requests: GrpcRequests,
) -> impl tonic::client::GrpcService<
    tonic::body::Body,
    Error = tonic::Status,
    ResponseBody: http_body::Body<Data = bytes::Bytes, Error = BoxError> + Send + 'static,
> + Clone {
    ServiceBuilder::new()
        .layer(IntoStatusLayer::new())
        .layer(BufferBodyLayer::new(64 * 1024))
        .layer(
            RetryLayer::http()
                .classifier(GrpcClassifier::new())
                .requests(requests)
                .backoff(Backoff::constant(Duration::from_millis(10)))
                .max_retries(3)
                .no_budget()
                .build()
                .unwrap(),
        )
        .layer(GrpcStatusLayer::new())
        .map_request(|r: http::Request<ReplayBody<tonic::body::Body>>| {
            r.map(tonic::body::Body::new)
        })
        .service(channel(addr))
}

#[tokio::test]
async fn unavailable_is_retried_and_invalid_argument_is_not() {
    let (addr, server) = serve(|n| {
        if n <= 2 {
            Reply::Fail(Code::Unavailable)
        } else {
            Reply::Ok
        }
    })
    .await;
    let pong = say(retrying(addr), "again").await.unwrap();
    assert_eq!(pong.message, "again");
    assert_eq!(pong.call, 3);
    assert_eq!(server.calls(), 3);

    let (addr, server) = serve(|_| Reply::Fail(Code::InvalidArgument)).await;
    let status = say(retrying(addr), "bad").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn a_method_not_named_safe_is_not_retried_after_unavailable() {
    let (addr, server) = serve(|_| Reply::Fail(Code::Unavailable)).await;
    let status = say(retrying_with(addr, GrpcRequests::new()), "once")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn unavailable_in_the_trailers_is_retried() {
    let (addr, server) = serve(|n| {
        if n == 1 {
            Reply::FailInTrailers(Code::Unavailable)
        } else {
            Reply::Ok
        }
    })
    .await;
    let pong = say(retrying(addr), "late").await.unwrap();
    assert_eq!(pong.call, 2);
    assert_eq!(server.calls(), 2);
}

#[tokio::test]
async fn a_status_in_the_trailers_opens_the_breaker() {
    let (addr, server) = serve(|_| Reply::FailInTrailers(Code::Internal)).await;
    let breaker = breaker(2);
    let handle = breaker.handle();
    let client = ServiceBuilder::new()
        .layer(IntoStatusLayer::new())
        .layer(breaker)
        .layer(GrpcStatusLayer::new())
        .service(channel(addr));

    for _ in 0..2 {
        let status = say(client.clone(), "hi").await.unwrap_err();
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "late");
    }
    assert_eq!(handle.state(), State::Open);

    // The open breaker answers for the server: UNAVAILABLE with a pushback.
    let status = say(client.clone(), "hi").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let pushback: u64 = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30_000).contains(&pushback), "pushback {pushback} ms");
    assert_eq!(server.calls(), 2);
}

#[tokio::test]
async fn without_the_status_layer_a_status_in_the_trailers_looks_like_success() {
    let (addr, server) = serve(|_| Reply::FailInTrailers(Code::Internal)).await;
    let breaker = breaker(2);
    let handle = breaker.handle();
    let client = ServiceBuilder::new()
        .layer(IntoStatusLayer::new())
        .layer(breaker)
        .map_err(BoxError::from)
        .service(channel(addr));

    for _ in 0..3 {
        let status = say(client.clone(), "hi").await.unwrap_err();
        assert_eq!(status.code(), Code::Internal);
    }
    // The breaker only saw `200 OK` headers: three provisional successes.
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(server.calls(), 3);
}

#[tokio::test]
async fn an_ok_call_keeps_its_message_and_trailers_status() {
    let (addr, _server) = serve(|_| Reply::Ok).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = ServiceBuilder::new()
        .layer(IntoStatusLayer::new())
        .layer(GrpcStatusLayer::new().on_status({
            let seen = seen.clone();
            move |o: &GrpcOutcome| seen.lock().unwrap().push(*o)
        }))
        .service(channel(addr));
    let pong = say(client, "hello").await.unwrap();
    assert_eq!(pong.message, "hello");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].code(), GrpcCode::Ok);
    assert!(seen[0].classification().is_success());
    assert!(!seen[0].is_streamed());
}

#[tokio::test]
async fn a_response_over_the_limit_streams_and_reports_at_the_end() {
    let (addr, _server) = serve(|_| Reply::FailInTrailers(Code::Unavailable)).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = ServiceBuilder::new()
        .layer(IntoStatusLayer::new())
        .layer(GrpcStatusLayer::new().with_limit(0).on_status({
            let seen = seen.clone();
            move |o: &GrpcOutcome| seen.lock().unwrap().push(*o)
        }))
        .service(channel(addr));
    let status = say(client, "hello").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].code(), GrpcCode::Unavailable);
    assert!(seen[0].classification().is_failure());
    assert!(seen[0].is_streamed());
}

#[tokio::test]
async fn a_full_server_bulkhead_answers_resource_exhausted() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_, echo) = echo::serve(|_| Reply::Ok).await; // only for its service type
    let entered = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let slow = tower::service_fn({
        let (entered, release) = (entered.clone(), release.clone());
        move |req: http::Request<tonic::body::Body>| {
            let mut echo = echo.clone();
            let (entered, release) = (entered.clone(), release.clone());
            async move {
                // Holds the only permit until the second call was refused.
                entered.notify_one();
                release.notified().await;
                tower::Service::call(&mut echo, req).await
            }
        }
    });
    let slow = Named(slow);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(
                ServiceBuilder::new()
                    .layer(IntoStatusLayer::new())
                    .layer(BulkheadLayer::new(1).unwrap()),
            )
            .add_service(slow)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap()
    });

    let client = channel(addr);
    let first = tokio::spawn(say(client.clone(), "first"));
    entered.notified().await;
    let status = say(client.clone(), "second").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    release.notify_one();
    assert_eq!(first.await.unwrap().unwrap().message, "first");
}

#[tokio::test]
async fn a_dead_port_is_unavailable_to_the_caller() {
    // Held, not listening: a connection is refused, and no other test takes the port.
    let dead = shared::DeadPort::new();
    let addr = dead.addr();
    let client = ServiceBuilder::new()
        .layer(IntoStatusLayer::new())
        .layer(GrpcStatusLayer::new())
        .service(channel(addr));
    let status = say(client, "hi").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

/// A tonic server behind the `Idempotency` layer runs a call once per key: the
/// repeat is answered from the store, trailers (`grpc-status`) and all, so the tonic
/// client decodes it as the same success.
#[tokio::test]
async fn a_grpc_server_behind_idempotency_runs_a_keyed_call_once() {
    let (addr, server) = serve_idempotent(|_| Reply::Ok).await;
    let client = channel(addr);
    let first = say_keyed(client.clone(), "order", Some("k-1"))
        .await
        .unwrap();
    let again = say_keyed(client.clone(), "order", Some("k-1"))
        .await
        .unwrap();
    assert_eq!(
        (first.call, again.call),
        (1, 1),
        "the repeat ran the handler"
    );
    assert_eq!(again.message, "order");
    assert_eq!(server.calls(), 1);
    // Another key, or none, runs.
    assert_eq!(
        say_keyed(client.clone(), "order", Some("k-2"))
            .await
            .unwrap()
            .call,
        2
    );
    assert_eq!(say(client, "order").await.unwrap().call, 3);
}

/// A key reused for another call reaches the tonic client as `INVALID_ARGUMENT` with
/// the layer's reason, not as the `UNKNOWN` an HTTP `422` decodes to.
#[tokio::test]
async fn a_grpc_key_reused_for_another_call_is_invalid_argument() {
    let (addr, server) = serve_idempotent(|_| Reply::Ok).await;
    let client = channel(addr);
    say_keyed(client.clone(), "order", Some("k-1"))
        .await
        .unwrap();
    let status = say_keyed(client, "another order", Some("k-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("different request"), "{status:?}");
    assert_eq!(server.calls(), 1);
}

/// `UNAVAILABLE` (trailers-only or after a message) is not remembered: the retry with
/// the key runs the handler and gets its success.
#[tokio::test]
async fn a_grpc_unavailable_is_not_remembered_by_idempotency() {
    let (addr, server) = serve_idempotent(|n| match n {
        1 => Reply::Fail(Code::Unavailable),
        2 => Reply::FailInTrailers(Code::Unavailable),
        _ => Reply::Ok,
    })
    .await;
    let client = channel(addr);
    for _ in 0..2 {
        let status = say_keyed(client.clone(), "order", Some("k-1"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    let pong = say_keyed(client, "order", Some("k-1")).await.unwrap();
    assert_eq!(pong.call, 3);
    assert_eq!(server.calls(), 3);
}

/// Gives a `service_fn` the service name tonic routes by.
#[derive(Clone)]
struct Named<S>(S);

impl<S> tonic::server::NamedService for Named<S> {
    const NAME: &'static str = "echo.Echo";
}

impl<S, R> tower::Service<R> for Named<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> S::Future {
        self.0.call(req)
    }
}
