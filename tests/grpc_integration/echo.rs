//! A hand-written `echo.Echo/Say` gRPC service and client plumbing: messages from
//! prost's derive macros and `tonic_prost::ProstCodec`, so nothing needs `protoc`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use tonic::Status;
use tonic::body::Body;
use tonic_prost::ProstCodec;
use tower::service_fn;

pub(crate) const SAY: &str = "/echo.Echo/Say";

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Ping {
    #[prost(string, tag = "1")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Pong {
    #[prost(string, tag = "1")]
    pub message: String,
    /// Which call this was (1-based), as the server counted it.
    #[prost(uint32, tag = "2")]
    pub call: u32,
}

/// What the server answers to one call.
#[derive(Clone, Debug)]
pub(crate) enum Reply {
    /// `Pong`, status OK.
    Ok,
    /// A trailers-only error (the status in the headers).
    Fail(tonic::Code),
    /// A `Pong`, then the error status in the trailers.
    FailInTrailers(tonic::Code),
}

type Plan = dyn Fn(u32) -> Reply + Send + Sync;

/// The server: answers call `n` (1-based) with `plan(n)` and counts calls.
#[derive(Clone)]
pub(crate) struct Echo {
    calls: Arc<AtomicU32>,
    plan: Arc<Plan>,
}

impl Echo {
    pub(crate) fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
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
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let reply = (self.plan)(n);
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Pong, Ping>::default());
            let pong = move |ping: tonic::Request<Ping>| Pong {
                message: ping.into_inner().message,
                call: n,
            };
            let res = match reply {
                Reply::Ok => {
                    grpc.unary(
                        service_fn(move |ping| async move {
                            Ok::<_, Status>(tonic::Response::new(pong(ping)))
                        }),
                        req,
                    )
                    .await
                }
                Reply::Fail(code) => {
                    grpc.unary(
                        service_fn(move |_: tonic::Request<Ping>| async move {
                            Err::<tonic::Response<Pong>, _>(Status::new(code, "scripted"))
                        }),
                        req,
                    )
                    .await
                }
                Reply::FailInTrailers(code) => {
                    grpc.server_streaming(
                        service_fn(move |ping| async move {
                            let items = vec![Ok(pong(ping)), Err(Status::new(code, "late"))];
                            Ok::<_, Status>(tonic::Response::new(tokio_stream::iter(items)))
                        }),
                        req,
                    )
                    .await
                }
            };
            Ok(res)
        })
    }
}

/// Serves `plan` on `127.0.0.1:0`.
pub(crate) async fn serve<F>(plan: F) -> (SocketAddr, Echo)
where
    F: Fn(u32) -> Reply + Send + Sync + 'static,
{
    let (listener, addr, echo) = echo(plan).await;
    let svc = echo.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap()
    });
    (addr, echo)
}

/// Serves `plan` on `127.0.0.1:0` behind the server-side `Idempotency` layer.
pub(crate) async fn serve_idempotent<F>(plan: F) -> (SocketAddr, Echo)
where
    F: Fn(u32) -> Reply + Send + Sync + 'static,
{
    let (listener, addr, echo) = echo(plan).await;
    let svc = echo.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(postbox::idempotency::IdempotencyLayer::new(100))
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap()
    });
    (addr, echo)
}

async fn echo<F>(plan: F) -> (tokio::net::TcpListener, SocketAddr, Echo)
where
    F: Fn(u32) -> Reply + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = Echo {
        calls: Arc::default(),
        plan: Arc::new(plan),
    };
    (listener, addr, echo)
}

/// A lazily connecting channel to `addr`.
pub(crate) fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

/// Calls `Say` through `svc`.
pub(crate) async fn say<S>(svc: S, message: &str) -> Result<Pong, Status>
where
    S: tonic::client::GrpcService<Body>,
    S::Error: Into<postbox::BoxError>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<postbox::BoxError> + Send,
{
    say_keyed(svc, message, None).await
}

/// Calls `Say` through `svc`, with `idempotency-key` metadata if `key` is given.
pub(crate) async fn say_keyed<S>(svc: S, message: &str, key: Option<&str>) -> Result<Pong, Status>
where
    S: tonic::client::GrpcService<Body>,
    S::Error: Into<postbox::BoxError>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<postbox::BoxError> + Send,
{
    let mut grpc = tonic::client::Grpc::new(svc);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.into().to_string()))?;
    let mut req = tonic::Request::new(Ping {
        message: message.to_owned(),
    });
    if let Some(key) = key {
        req.metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
    }
    grpc.unary(
        req,
        http::uri::PathAndQuery::from_static(SAY),
        ProstCodec::<Ping, Pong>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}
