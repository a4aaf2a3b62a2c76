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
        ErrorResponse { inner }
    }
}

/// See [`ErrorResponseLayer`].
#[derive(Debug, Clone)]
pub struct ErrorResponse<S> {
    inner: S,
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

impl<S, Req> Service<Req> for ErrorResponse<S>
where
    S: Service<Req>,
    S::Response: IntoResponse,
    S::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A service that fails readiness is broken for good; postbox layers never do
        // (they reject in `call`). Report the error on the next call instead.
        match ready!(self.inner.poll_ready(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => {
                let e: BoxError = e.into();
                tracing::error!(error = %e, "inner service failed readiness");
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`ErrorResponse`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
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
        Poll::Ready(Ok(match ready!(self.project().inner.poll(cx)) {
            Ok(res) => res.into_response(),
            Err(e) => crate::error::into_response(e.into()),
        }))
    }
}
