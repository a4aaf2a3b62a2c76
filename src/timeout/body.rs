//! The call's deadline over the response body: [`BodyDeadlineLayer`].
//!
//! [`Deadline`](super::Deadline) and [`AttemptTimeout`](super::AttemptTimeout) bound
//! the response future, which completes with the response's head. A server that sends
//! its head and then stalls in the body would hold the caller (and its connection)
//! for as long as it likes. [`BodyDeadline`] carries the request's
//! [`CallDeadline`] (set by [`DeadlineLayer::http`](super::DeadlineLayer::http) or
//! [`AttemptTimeoutLayer::http`](super::AttemptTimeoutLayer::http) outside it) over to
//! the response body: a frame still pending when the deadline passes fails the body
//! with [`BodyDeadlineExceeded`].

use super::error::BodyDeadlineExceeded;
use super::service::CallDeadline;
use crate::BoxError;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::time::{Instant, Sleep, sleep_until};
use tower_layer::Layer;
use tower_service::Service;

/// Applies [`BodyDeadline`]: the call's [`CallDeadline`] bounds the response body too.
///
/// Place it inside the layer that sets the deadline ([`DeadlineLayer::http`]), as near
/// the client as the body type allows: the response body becomes a
/// [`DeadlineBody`]. A request without a `CallDeadline` gets an unbounded body.
///
/// ```
/// use std::time::Duration;
/// use postbox::timeout::{BodyDeadlineLayer, DeadlineLayer};
/// use tower::{ServiceBuilder, service_fn};
///
/// # fn main() -> Result<(), postbox::error::ConfigError> {
/// let svc = ServiceBuilder::new()
///     .layer(DeadlineLayer::http(Duration::from_secs(2))?)
///     .layer(BodyDeadlineLayer::new())
///     .service(service_fn(|_req: http::Request<String>| async {
///         Ok::<_, postbox::BoxError>(http::Response::new(String::from("hi")))
///     }));
/// # let _ = svc; Ok(()) }
/// ```
///
/// [`DeadlineLayer::http`]: super::DeadlineLayer::http
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyDeadlineLayer {
    _priv: (),
}

impl BodyDeadlineLayer {
    /// The layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for BodyDeadlineLayer {
    type Service = BodyDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyDeadline { inner }
    }
}

/// Wraps the response body in a [`DeadlineBody`] bound by the request's
/// [`CallDeadline`]; see [`BodyDeadlineLayer`].
#[derive(Debug, Clone)]
pub struct BodyDeadline<S> {
    inner: S,
}

impl<S> BodyDeadline<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for BodyDeadline<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<DeadlineBody<ResBody>>;
    type Error = S::Error;
    type Future = BodyDeadlineFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let at = req.extensions().get::<CallDeadline>().map(CallDeadline::at);
        BodyDeadlineFuture {
            inner: self.inner.call(req),
            at,
        }
    }
}

pin_project! {
    /// Response future of [`BodyDeadline`].
    #[derive(Debug)]
    pub struct BodyDeadlineFuture<F> {
        #[pin]
        inner: F,
        at: Option<Instant>,
    }
}

impl<F, B, E> Future for BodyDeadlineFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<DeadlineBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx))?;
        let at = *this.at;
        Poll::Ready(Ok(res.map(|body| DeadlineBody::new(body, at))))
    }
}

pin_project! {
    /// A response body that fails with [`BodyDeadlineExceeded`] if a frame is still
    /// pending when the call's deadline passes. Its errors are boxed: the inner
    /// body's own, or a `BodyDeadlineExceeded`.
    ///
    /// The timer is armed only once the inner body is pending: a body read without
    /// waiting never touches the timer wheel.
    #[derive(Debug)]
    pub struct DeadlineBody<B> {
        #[pin]
        inner: B,
        at: Option<Instant>,
        #[pin]
        sleep: Option<Sleep>,
        expired: bool,
    }
}

impl<B> DeadlineBody<B> {
    /// `inner`, failing once `at` passes (never, with `None`).
    pub const fn new(inner: B, at: Option<Instant>) -> Self {
        Self {
            inner,
            at,
            sleep: None,
            expired: false,
        }
    }

    /// The deadline, if any.
    pub const fn deadline(&self) -> Option<Instant> {
        self.at
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let Some(at) = *this.at else {
            return Poll::Pending;
        };
        if this.sleep.is_none() {
            this.sleep.set(Some(sleep_until(at)));
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            ready!(sleep.poll(cx));
        }
        *this.expired = true;
        tracing::debug!("response body still pending at the call's deadline");
        metrics::counter!("postbox_calls_total", "layer" => "body_deadline", "outcome" => "deadline_exceeded")
            .increment(1);
        Poll::Ready(Some(Err(BodyDeadlineExceeded::new().into())))
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.expired {
            return SizeHint::with_exact(0);
        }
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use std::time::Duration;

    /// A body that yields one chunk, then stalls forever.
    struct Stalls(bool);

    impl Body for Stalls {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"head")))))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_at_the_deadline_not_before() {
        let start = Instant::now();
        let at = start + Duration::from_secs(2);
        let mut body = std::pin::pin!(DeadlineBody::new(Stalls(false), Some(at)));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "head");
        // (Bounded, so that a regression fails instead of hanging.)
        let err = tokio::time::timeout(Duration::from_secs(60), body.frame())
            .await
            .expect("the body fails at the deadline, not never")
            .unwrap()
            .unwrap_err();
        assert!(err.is::<BodyDeadlineExceeded>(), "{err}");
        assert_eq!(Instant::now(), at, "failed exactly at the deadline");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none(), "ends after the error");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_completes_in_time_is_untouched() {
        let at = Instant::now() + Duration::from_secs(2);
        let body = DeadlineBody::new(http_body_util::Full::new(Bytes::from("all")), Some(at));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "all");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_call_deadline_the_body_is_unbounded() {
        let svc =
            BodyDeadlineLayer::new().layer(tower::service_fn(|_req: http::Request<()>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Stalls(false)))
            }));
        let res = tower::ServiceExt::oneshot(svc, http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(res.body().deadline(), None);
        let mut body = std::pin::pin!(res.into_body());
        body.frame().await.unwrap().unwrap();
        let stalled = tokio::time::timeout(Duration::from_secs(3600), body.frame()).await;
        assert!(stalled.is_err(), "still pending an hour later");
    }

    #[tokio::test(start_paused = true)]
    async fn the_request_call_deadline_reaches_the_response_body() {
        let at = Instant::now() + Duration::from_millis(300);
        let svc =
            BodyDeadlineLayer::new().layer(tower::service_fn(|_req: http::Request<()>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Stalls(false)))
            }));
        let mut req = http::Request::new(());
        req.extensions_mut().insert(CallDeadline::new(at));
        let res = tower::ServiceExt::oneshot(svc, req).await.unwrap();
        assert_eq!(res.body().deadline(), Some(at));
    }
}
