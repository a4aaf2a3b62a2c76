//! Errors as `tonic::Status`: [`IntoStatusLayer`] and its future.

use crate::BoxError;
use crate::bulkhead::error::Full;
use crate::circuit_breaker::error::Open;
use crate::enqueue::error::NotEnqueued;
use crate::error::is_caused_by;
use crate::timeout::error::{BodyDeadlineExceeded, DeadlineExceeded, Elapsed};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

/// The `tonic::Status` for an error.
///
/// A postbox error anywhere in the cause chain gets its mapping (see
/// [`crate::error`]: an open breaker is `UNAVAILABLE` with `grpc-retry-pushback-ms`,
/// a full bulkhead `RESOURCE_EXHAUSTED`, a timeout or a passed deadline
/// `DEADLINE_EXCEEDED`, tonic's own `TimeoutExpired` too, which tonic would answer
/// `CANCELLED`, and so would it a call hyper dropped before dispatching it, its
/// connection closed: `UNAVAILABLE`; a caller's broken upload `CANCELLED`); anything else goes through tonic's own
/// [`Status::from_error`] (a `Status` in the chain, HTTP/2 and connect errors), so a
/// transport failure reads exactly as it would without postbox.
pub fn into_status(err: BoxError) -> Status {
    if is_caused_by::<Open>(&*err)
        || is_caused_by::<Full>(&*err)
        || is_caused_by::<Elapsed>(&*err)
        || is_caused_by::<DeadlineExceeded>(&*err)
        || is_caused_by::<BodyDeadlineExceeded>(&*err)
        || is_caused_by::<tonic::TimeoutExpired>(&*err)
        || is_caused_by::<NotEnqueued>(&*err)
        || is_caused_by::<crate::http::body::RequestBodyFailed>(&*err)
        || crate::error::find_cause::<hyper::Error>(&*err).is_some_and(hyper::Error::is_canceled)
    {
        return crate::error::to_status(&*err);
    }
    Status::from_error(err)
}

/// Turns every error of the inner service into a `tonic::Status` with
/// [`into_status`].
///
/// tonic finds a `Status` error as it is, so on a client (outermost around a
/// `Channel` stack) the caller of a generated or hand-written client sees
/// `UNAVAILABLE` with a pushback for an open breaker instead of `UNKNOWN`; on a server
/// (`Server::builder().layer(..)`) tonic answers the status instead of dropping the
/// stream.
///
/// # Example
/// ```
/// use postbox::grpc::IntoStatusLayer;
/// use postbox::circuit_breaker::error::Open;
/// use std::time::Duration;
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = IntoStatusLayer::new().layer(service_fn(|_: ()| async {
///     Err::<(), postbox::BoxError>(Open::new(Duration::from_millis(300)).into())
/// }));
/// let status = svc.oneshot(()).await.unwrap_err();
/// assert_eq!(status.code(), tonic::Code::Unavailable);
/// assert_eq!(status.metadata().get("grpc-retry-pushback-ms").unwrap(), "300");
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct IntoStatusLayer {
    _priv: (),
}

impl IntoStatusLayer {
    /// The layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for IntoStatusLayer {
    type Service = IntoStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IntoStatus { inner }
    }
}

/// See [`IntoStatusLayer`].
#[derive(Debug, Clone)]
pub struct IntoStatus<S> {
    inner: S,
}

// === impl IntoStatus ===

impl<S> IntoStatus<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the wrapper, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req> Service<Req> for IntoStatus<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = Status;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|e| into_status(e.into()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Response future of [`IntoStatus`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, Status>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(ready!(self.project().inner.poll(cx)).map_err(|e| into_status(e.into())))
    }
}
