//! The call's deadline over the response body: [`BodyDeadlineLayer`].
//!
//! [`Deadline`](super::Deadline) and [`AttemptTimeout`](super::AttemptTimeout) bound
//! the response future, which completes with the response's head. A server that sends
//! its head and then stalls in the body would hold the caller (and its connection)
//! for as long as it likes. [`BodyDeadline`] carries the call's deadline (the request's
//! [`CallDeadline::call_at`], set by [`DeadlineLayer::http`](super::DeadlineLayer::http)
//! outside it: the whole call's, also inside an
//! [`AttemptTimeoutLayer::http`](super::AttemptTimeoutLayer::http), whose end the retry
//! has stopped watching once the head arrived) over to the response body: a frame still
//! pending when the deadline passes fails the body with [`BodyDeadlineExceeded`] (in a
//! `tonic::Status` of `DEADLINE_EXCEEDED`, with `grpc`, for a gRPC answer).
//!
//! It cuts a stall, not a slow reader: frames the body has ready are handed out even
//! after the deadline.

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
/// Place it inside the layer that sets the deadline ([`DeadlineLayer::http`]), anywhere
/// down to just above the client (inside a config-built client stack, too): the
/// response body becomes a [`DeadlineBody`], bound by the call's deadline. A request
/// without a `CallDeadline` gets an unbounded body. Needs tokio's timer.
///
/// Two things bound a body sooner than the call's deadline:
/// - Under an [`AttemptTimeoutLayer::http`](super::AttemptTimeoutLayer::http) with no
///   call deadline outside (no [`DeadlineLayer::http`], no timeout header from the
///   caller), the attempt's end is the call's deadline, and the body is held to it.
/// - The next hop is told the attempt's end, not the call's: a server that honours
///   `grpc-timeout` for the whole call (grpc-go, grpc-java) ends a streamed answer
///   then. A method whose body outlasts its attempt timeout (a server stream) needs
///   an attempt timeout that covers the body, or none.
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
        let at = req
            .extensions()
            .get::<CallDeadline>()
            .map(CallDeadline::call_at);
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
        let grpc = crate::http::is_grpc(res.headers());
        let at = *this.at;
        Poll::Ready(Ok(res.map(|body| DeadlineBody {
            grpc,
            ..DeadlineBody::new(body, at)
        })))
    }
}

pin_project! {
    /// A response body that fails with [`BodyDeadlineExceeded`] if a frame is still
    /// pending when the call's deadline passes. Its errors are boxed: the inner
    /// body's own, or a `BodyDeadlineExceeded` (for a gRPC answer with `grpc`, inside
    /// a `tonic::Status` of `DEADLINE_EXCEEDED`, which tonic hands its caller).
    ///
    /// The timer is armed (and boxed) only once the inner body is pending: a body read
    /// without waiting never touches the timer wheel. `Unpin` when `B` is.
    #[derive(Debug)]
    pub struct DeadlineBody<B> {
        #[pin]
        inner: B,
        at: Option<Instant>,
        sleep: Option<Pin<Box<Sleep>>>,
        expired: bool,
        grpc: bool,
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
            grpc: false,
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
        let this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            // (An armed timer stays until the body is dropped: clearing it here, on the
            // end, made every ready frame 1.5× slower to hand out; `body/deadline`.)
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let Some(at) = *this.at else {
            return Poll::Pending;
        };
        ready!(
            this.sleep
                .get_or_insert_with(|| Box::pin(sleep_until(at)))
                .as_mut()
                .poll(cx)
        );
        *this.expired = true;
        *this.sleep = None;
        tracing::debug!("response body still pending at the call's deadline");
        metrics::counter!("postbox_calls_total", "layer" => "body_deadline", "outcome" => "deadline_exceeded")
            .increment(1);
        Poll::Ready(Some(Err(expired(*this.grpc))))
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

/// The error a body ends with at its deadline: for a gRPC answer (with `grpc`), a
/// `tonic::Status` of `DEADLINE_EXCEEDED` whose source is ours, as tonic reports only a
/// `Status` it finds in a body error (anything else is `UNKNOWN` to its caller).
fn expired(grpc: bool) -> BoxError {
    #[cfg(feature = "grpc")]
    if grpc {
        return tonic::Status::from(BodyDeadlineExceeded::new()).into();
    }
    let _ = grpc;
    BodyDeadlineExceeded::new().into()
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
        assert!(body.sleep.is_none(), "off the timer wheel once expired");
        assert_eq!(Instant::now(), at, "failed exactly at the deadline");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none(), "ends after the error");
    }

    /// A gRPC answer's body ends in a `DEADLINE_EXCEEDED` status (tonic hands a
    /// `Status` it finds in a body error to its caller; anything else is `UNKNOWN`),
    /// with our error as its source.
    #[cfg(feature = "grpc")]
    #[tokio::test(start_paused = true)]
    async fn a_grpc_body_fails_with_a_deadline_exceeded_status() {
        let at = Instant::now() + Duration::from_millis(300);
        let svc =
            BodyDeadlineLayer::new().layer(tower::service_fn(|_req: http::Request<()>| async {
                let mut res = http::Response::new(Stalls(true));
                res.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("Application/gRPC+proto"),
                );
                Ok::<_, std::convert::Infallible>(res)
            }));
        let mut req = http::Request::new(());
        req.extensions_mut().insert(CallDeadline::new(at));
        let res = tower::ServiceExt::oneshot(svc, req).await.unwrap();
        let mut body = std::pin::pin!(res.into_body());
        let err = tokio::time::timeout(Duration::from_secs(60), body.frame())
            .await
            .expect("the body fails at the deadline, not never")
            .unwrap()
            .unwrap_err();
        let status = err.downcast_ref::<tonic::Status>().expect("a Status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(crate::error::is_caused_by::<BodyDeadlineExceeded>(&*err));
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

    /// Inside an attempt timeout the request's `CallDeadline` is the attempt's end, and
    /// its `call_at` still the call's: the body is bound by the call's.
    #[tokio::test(start_paused = true)]
    async fn inside_an_attempt_timeout_the_body_gets_the_calls_deadline() {
        use crate::timeout::{AttemptTimeoutLayer, DeadlineLayer};
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
        let svc = tower::ServiceBuilder::new()
            .layer(DeadlineLayer::http(Duration::from_secs(10)).unwrap())
            .layer(AttemptTimeoutLayer::http(Duration::from_secs(2)).unwrap())
            .layer(BodyDeadlineLayer::new())
            .service(tower::service_fn({
                let seen = seen.clone();
                move |req: http::Request<()>| {
                    *seen.lock().unwrap() = req.extensions().get::<CallDeadline>().copied();
                    async { Ok::<_, crate::BoxError>(http::Response::new(Stalls(true))) }
                }
            }));
        let start = Instant::now();
        let res = tower::ServiceExt::oneshot(svc, http::Request::new(()))
            .await
            .unwrap();
        let seen = seen.lock().unwrap().expect("a CallDeadline");
        assert_eq!(seen.at(), start + Duration::from_secs(2));
        assert_eq!(seen.call_at(), start + Duration::from_secs(10));
        assert_eq!(res.body().deadline(), Some(start + Duration::from_secs(10)));
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
