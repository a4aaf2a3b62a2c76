use crate::BoxError;
use axum_core::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tower_layer::Layer;
use tower_service::Service;

/// Answers errors with responses, so a stack of postbox layers around an axum `Router`
/// (or any service whose response implements `IntoResponse`) has the `Infallible`
/// error axum requires — no `HandleErrorLayer` boilerplate.
///
/// A postbox error anywhere in the cause chain gets its mapping (503 + `Retry-After`
/// for an open circuit or a full bulkhead, 504 for a timeout or a passed deadline);
/// anything else is a 500. See [`crate::error::into_response`].
///
/// With the `grpc` feature, a gRPC request (`content-type: application/grpc…`) gets a
/// trailers-only gRPC answer instead ([`crate::error::to_status`]: `UNAVAILABLE` with
/// `grpc-retry-pushback-ms` for an open circuit, `RESOURCE_EXHAUSTED` for a full
/// bulkhead, `DEADLINE_EXCEEDED` for a timeout or a passed deadline, `UNKNOWN` with a
/// fixed message for anything else): a gRPC client reads an HTTP `503` or `504` as
/// `UNAVAILABLE`, which says the call never ran, even when a deadline cut it off
/// part-way.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use axum::{Router, routing::post};
/// use postbox::{bulkhead::BulkheadLayer, http::ErrorResponseLayer, timeout::DeadlineLayer};
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), postbox::error::ConfigError> {
/// let app: Router = Router::new()
///     .route("/orders", post(|| async { "stored" }))
///     .layer(
///         ServiceBuilder::new()
///             .layer(ErrorResponseLayer::new())
///             .layer(DeadlineLayer::new(Duration::from_secs(5))?)
///             .layer(BulkheadLayer::new(256)?),
///     );
/// # let _ = app; Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorResponseLayer {
    _priv: (),
}

impl ErrorResponseLayer {
    /// The layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ErrorResponse {
            inner,
            not_ready: None,
        }
    }
}

/// See [`ErrorResponseLayer`].
#[derive(Debug)]
pub struct ErrorResponse<S> {
    inner: S,
    /// The inner service failed readiness: the next call is answered with this error,
    /// without calling it (it is not ready).
    not_ready: Option<BoxError>,
}

impl<S: Clone> Clone for ErrorResponse<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            not_ready: None,
        }
    }
}

impl<S> ErrorResponse<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes the layer, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<http::Request<B>> for ErrorResponse<S>
where
    S: Service<http::Request<B>>,
    S::Response: IntoResponse,
    S::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A service that fails readiness is broken for good; postbox layers never do
        // (they reject in `call`). Answer the next call with the error instead, without
        // calling the service, which is not ready (tower's contract).
        if self.not_ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        match ready!(self.inner.poll_ready(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => {
                let e: BoxError = e.into();
                tracing::error!(error = %e, "inner service failed readiness");
                self.not_ready = Some(e);
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        #[cfg(feature = "grpc")]
        let grpc = super::grpc_kind(req.headers());
        #[cfg(not(feature = "grpc"))]
        let grpc = None;
        match self.not_ready.take() {
            Some(e) => ResponseFuture {
                grpc,
                kind: Kind::Answered {
                    res: Some(error_response(e, grpc)),
                },
            },
            None => ResponseFuture {
                grpc,
                kind: Kind::Called {
                    inner: self.inner.call(req),
                },
            },
        }
    }
}

/// The answer for `err` to a request of the gRPC protocol `grpc` (`None`: not gRPC).
fn error_response(err: BoxError, grpc: Option<super::GrpcKind>) -> Response {
    #[cfg(feature = "grpc")]
    if let Some(kind) = grpc {
        let status = crate::error::known_status(&*err).unwrap_or_else(|| {
            // As for HTTP: the error is logged, not sent (an upstream's address).
            tracing::error!(error = %err, "unhandled error answered UNKNOWN");
            tonic::Status::unknown("internal server error")
        });
        let mut res: Response = status.into_http();
        res.headers_mut()
            .insert(http::header::CONTENT_TYPE, kind.content_type());
        return res;
    }
    let _ = grpc;
    crate::error::into_response(err)
}

pin_project_lite::pin_project! {
    /// Response future of [`ErrorResponse`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        grpc: Option<super::GrpcKind>,
        #[pin]
        kind: Kind<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<F> {
        Called {
            #[pin]
            inner: F,
        },
        Answered {
            res: Option<Response>,
        },
    }
}

impl<F, R, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<R, E>>,
    R: IntoResponse,
    E: Into<BoxError>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Called { inner } => Poll::Ready(Ok(match ready!(inner.poll(cx)) {
                Ok(res) => res.into_response(),
                Err(e) => error_response(e.into(), *this.grpc),
            })),
            KindProj::Answered { res } => Poll::Ready(Ok(res
                .take()
                .expect("ErrorResponse future polled after completion"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_test::mock;

    /// A readiness error is answered on the next call without calling the inner
    /// service, which is not ready (calling it anyway breaks tower's contract: a
    /// `Buffer` whose worker died, or this mock, panics).
    #[tokio::test]
    async fn a_readiness_error_is_answered_without_calling_the_inner_service() {
        let (inner, mut handle) = mock::pair::<http::Request<()>, Response>();
        let mut svc = mock::Spawn::new(ErrorResponseLayer::new().layer(inner));
        handle.send_error("broken for good");
        tokio_test::assert_ready_ok!(svc.poll_ready());
        let res = svc.call(http::Request::new(())).await.unwrap();
        assert_eq!(res.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        tokio_test::assert_pending!(handle.poll_request());
        // The error's text stays in the log, out of the client's answer.
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body, "internal server error");
    }

    /// A gRPC request gets a gRPC answer: our own rejections as their gRPC codes (a
    /// client reads an HTTP `503` or `504` as `UNAVAILABLE`: "never ran", even for a
    /// deadline that cut the handler off), anything else as `UNKNOWN` with a fixed
    /// message; in the request's own protocol (gRPC-Web too).
    #[cfg(feature = "grpc")]
    #[tokio::test]
    async fn a_grpc_request_gets_its_error_as_a_grpc_status() {
        use crate::bulkhead::error::Full;
        use crate::timeout::error::DeadlineExceeded;
        let cases: [(BoxError, &str, &str, &str); 4] = [
            (
                Full::new(1, 0).into(),
                "application/grpc",
                "8",
                "application/grpc",
            ),
            (
                DeadlineExceeded::new(std::time::Duration::from_secs(1), false).into(),
                "application/grpc+proto",
                "4",
                "application/grpc",
            ),
            (
                "secret upstream 10.0.0.7 failed".into(),
                "application/grpc",
                "2",
                "application/grpc",
            ),
            (
                Full::new(1, 0).into(),
                "application/grpc-web+proto",
                "8",
                "application/grpc-web+proto",
            ),
        ];
        for (err, request_type, code, answer_type) in cases {
            let (inner, mut handle) = mock::pair::<http::Request<()>, Response>();
            let mut svc = mock::Spawn::new(ErrorResponseLayer::new().layer(inner));
            handle.allow(1);
            tokio_test::assert_ready_ok!(svc.poll_ready());
            let req = http::Request::builder()
                .header(http::header::CONTENT_TYPE, request_type)
                .body(())
                .unwrap();
            let fut = svc.call(req);
            let (_, send) = handle.next_request().await.unwrap();
            send.send_error(err);
            let res = fut.await.unwrap();
            assert_eq!(res.status(), http::StatusCode::OK, "{code}");
            assert_eq!(res.headers()["grpc-status"], code);
            assert_eq!(res.headers()[http::header::CONTENT_TYPE], answer_type);
            let message = res.headers()["grpc-message"].to_str().unwrap();
            assert!(!message.contains("10.0.0.7"), "{message}");
        }
        // Not gRPC: the HTTP mapping.
        let (inner, mut handle) = mock::pair::<http::Request<()>, Response>();
        let mut svc = mock::Spawn::new(ErrorResponseLayer::new().layer(inner));
        handle.allow(1);
        tokio_test::assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(http::Request::new(()));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(Full::new(1, 0));
        let res = fut.await.unwrap();
        assert_eq!(res.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(res.headers().get("grpc-status").is_none());
    }
}
