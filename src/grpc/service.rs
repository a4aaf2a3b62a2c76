use super::future::ResponseFuture;
use crate::BoxError;
use crate::classify::GrpcClassifier;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_service::Service;

/// Reads gRPC response bodies before returning the response, so a non-OK status in
/// the trailers becomes visible to the layers above; see the [module docs](super).
///
/// Errors become [`BoxError`] (reading the body can fail). The response body must be
/// `Unpin`, as tonic's and hyper's are (box any other with `BodyExt::boxed_unsync`).
///
/// # Clone
/// Cheap when `S` is: the hook is shared.
pub struct GrpcStatus<S, H = ()> {
    inner: S,
    limit: usize,
    classifier: GrpcClassifier,
    hook: Arc<H>,
    stream_through: Arc<[String]>,
}

// === impl GrpcStatus ===

impl<S, H> GrpcStatus<S, H> {
    pub(crate) fn new(
        inner: S,
        limit: usize,
        classifier: GrpcClassifier,
        hook: Arc<H>,
        stream_through: Arc<[String]>,
    ) -> Self {
        Self {
            inner,
            limit,
            classifier,
            hook,
            stream_through,
        }
    }

    fn streams(&self, path: &str) -> bool {
        self.stream_through
            .iter()
            .any(|p| super::names_method(p, path))
    }

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

impl<S: Clone, H> Clone for GrpcStatus<S, H> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limit: self.limit,
            classifier: self.classifier,
            hook: self.hook.clone(),
            stream_through: self.stream_through.clone(),
        }
    }
}

impl<S: fmt::Debug, H> fmt::Debug for GrpcStatus<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcStatus")
            .field("inner", &self.inner)
            .field("limit", &self.limit)
            .field("classifier", &self.classifier)
            .finish_non_exhaustive()
    }
}

impl<S, H, ReqB, B> Service<http::Request<ReqB>> for GrpcStatus<S, H>
where
    S: Service<http::Request<ReqB>, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body + Unpin,
    B::Error: Into<BoxError>,
    H: super::OnGrpcStatus,
{
    type Response = http::Response<super::GrpcStatusBody<B, H>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, B, H>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let limit = (!self.streams(req.uri().path())).then_some(self.limit);
        // A request with a content type that is not gRPC's is another protocol's; one
        // without a content type is known by its answer (`None`).
        let passthrough = req
            .headers()
            .contains_key(http::header::CONTENT_TYPE)
            .then(|| !crate::http::is_grpc(req.headers()));
        ResponseFuture::new(
            self.inner.call(req),
            limit,
            passthrough,
            self.classifier,
            self.hook.clone(),
        )
    }
}
