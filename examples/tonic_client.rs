//! A tonic client behind the postbox stack, talking to a tonic server in the same
//! process on loopback. Messages come from prost's derive macros and the service
//! plumbing is written by hand, so nothing needs `protoc`.
//!
//! The stack, outermost first:
//!
//! ```text
//! IntoStatus ─► BufferBody ─► Retry ─► CircuitBreaker ─► AttemptTimeout ─► GrpcStatus ─► Channel
//! ```
//!
//! It shows `UNAVAILABLE` retried, `INVALID_ARGUMENT` not, a status sent in the trailers
//! seen by the retry, and an open breaker answering `UNAVAILABLE` with a pushback.
//!
//! Run with `cargo run --example tonic_client --features grpc`.

use postbox::BoxError;
use postbox::circuit_breaker::CircuitBreakerLayer;
use postbox::classify::GrpcClassifier;
use postbox::grpc::{GrpcRequests, GrpcStatusLayer, IntoStatusLayer};
use postbox::http::body::{BufferBodyLayer, ReplayBody};
use postbox::retry::RetryLayer;
use postbox::retry::backoff::Backoff;
use postbox::timeout::AttemptTimeoutLayer;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tower::{ServiceBuilder, service_fn};

// === messages (what `protoc` would generate, written with prost's derive) ===

/// `echo.Ping`.
#[derive(Clone, PartialEq, prost::Message)]
struct Ping {
    #[prost(string, tag = "1")]
    message: String,
}

/// `echo.Pong`.
#[derive(Clone, PartialEq, prost::Message)]
struct Pong {
    #[prost(string, tag = "1")]
    message: String,
    #[prost(uint32, tag = "2")]
    attempt: u32,
}

// === server: `echo.Echo/Say`, failing on purpose ===

/// Fails the first two calls with each message with the code it names (`"unavailable"`,
/// `"invalid"`, `"late"` for `UNAVAILABLE` sent in the trailers after a message).
#[derive(Clone, Default)]
struct Echo {
    /// Calls in all.
    calls: Arc<AtomicU32>,
    /// Calls per message.
    per_message: Arc<Mutex<HashMap<String, u32>>>,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "echo.Echo";
}

impl tower::Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let per_message = self.per_message.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Pong, Ping>::default());
            let res = grpc
                .server_streaming(
                    service_fn(move |req: tonic::Request<Ping>| {
                        let message = req.into_inner().message;
                        let attempt = {
                            let mut seen = per_message.lock().unwrap();
                            let n = seen.entry(message.clone()).or_default();
                            *n += 1;
                            *n
                        };
                        async move {
                            let pong = Pong {
                                message: message.clone(),
                                attempt,
                            };
                            let fail = attempt <= 2;
                            let items = match message.as_str() {
                                "unavailable" if fail => {
                                    return Err(Status::unavailable("warming up"));
                                }
                                "invalid" => return Err(Status::invalid_argument("no such thing")),
                                // A message, then the status in the trailers.
                                "late" if fail => vec![Ok(pong), Err(Status::unavailable("late"))],
                                _ => vec![Ok(pong)],
                            };
                            Ok(tonic::Response::new(tokio_stream::iter(items)))
                        }
                    }),
                    req,
                )
                .await;
            Ok(res)
        })
    }
}

// === client plumbing: what `tonic-build` would generate ===

async fn say<S>(svc: S, message: &str) -> Result<Pong, Status>
where
    S: tonic::client::GrpcService<Body>,
    S::Error: Into<BoxError>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    let mut grpc = tonic::client::Grpc::new(svc);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(e.into().to_string()))?;
    grpc.unary(
        tonic::Request::new(Ping {
            message: message.to_owned(),
        }),
        http::uri::PathAndQuery::from_static("/echo.Echo/Say"),
        ProstCodec::<Ping, Pong>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let echo = Echo::default();
    tokio::spawn({
        let echo = echo.clone();
        tonic::transport::Server::builder()
            .add_service(echo)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy();

    let breaker = CircuitBreakerLayer::builder()
        .name("echo")
        .consecutive_failures(5)
        .break_duration(Duration::from_secs(5))
        .build()?
        .with_classifier(GrpcClassifier::new());
    let handle = breaker.handle();
    let client = ServiceBuilder::new()
        // Our errors become the `Status` the caller sees.
        .layer(IntoStatusLayer::new())
        // gRPC calls are POSTs: make the body replayable ...
        .layer(BufferBodyLayer::new(64 * 1024))
        .layer(
            RetryLayer::http()
                .classifier(GrpcClassifier::new())
                // ... and name the methods that are safe to repeat.
                .requests(GrpcRequests::new().idempotent("/echo.Echo/Say"))
                .max_retries(3)
                .backoff(Backoff::exponential(Duration::from_millis(20)))
                .max_retry_after(Duration::from_secs(1))
                .build()?,
        )
        .layer(breaker)
        .layer(AttemptTimeoutLayer::new(Duration::from_millis(500))?)
        // Innermost: read unary bodies so a status in the trailers is seen above.
        .layer(GrpcStatusLayer::new())
        .map_request(|r: http::Request<ReplayBody<Body>>| r.map(Body::new))
        .service(channel);

    // hello: ok at once; unavailable: UNAVAILABLE twice, then ok; late: a message and
    // UNAVAILABLE in the trailers twice, then ok; invalid: INVALID_ARGUMENT, not retried.
    for message in ["hello", "unavailable", "late", "invalid"] {
        let before = echo.calls.load(Ordering::SeqCst);
        let outcome = say(client.clone(), message).await;
        let calls = echo.calls.load(Ordering::SeqCst) - before;
        match outcome {
            Ok(pong) => println!("{message:>12}: ok on attempt {}", pong.attempt),
            Err(status) => println!("{message:>12}: {:?} after {calls} call(s)", status.code()),
        }
    }

    // Open the breaker by hand (as a burst of failures would): the caller gets
    // UNAVAILABLE with a pushback, and the server is not called.
    handle.force_open();
    let before = echo.calls.load(Ordering::SeqCst);
    let status = say(client.clone(), "hello").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    println!(
        "{:>12}: {:?}, grpc-retry-pushback-ms = {:?}, {} server call(s)",
        "open breaker",
        status.code(),
        status.metadata().get("grpc-retry-pushback-ms"),
        echo.calls.load(Ordering::SeqCst) - before,
    );
    Ok(())
}
