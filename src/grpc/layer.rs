use super::service::GrpcStatus;
use crate::classify::GrpcClassifier;
use std::sync::Arc;
use tower_layer::Layer;

/// The default buffer limit of [`GrpcStatusLayer`]: 64 KiB.
pub const DEFAULT_BUFFER_LIMIT: usize = 64 * 1024;

/// Applies [`GrpcStatus`]: reads each gRPC response body (up to a limit) before
/// returning the response, so the status carried in the trailers is known to the
/// layers above; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct GrpcStatusLayer<H = ()> {
    limit: usize,
    classifier: GrpcClassifier,
    hook: Arc<H>,
    stream_through: Arc<[String]>,
}

// === impl GrpcStatusLayer ===

impl GrpcStatusLayer {
    /// Buffers bodies of up to [`DEFAULT_BUFFER_LIMIT`] bytes, with the default
    /// [`GrpcClassifier`] and no hook.
    pub fn new() -> Self {
        Self {
            limit: DEFAULT_BUFFER_LIMIT,
            classifier: GrpcClassifier::new(),
            hook: Arc::new(()),
            stream_through: Arc::new([]),
        }
    }
}

impl Default for GrpcStatusLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<H> GrpcStatusLayer<H> {
    /// Buffers bodies of up to `limit` bytes; a longer body is streamed through and
    /// its status reported only to the hook, when it ends. `0` buffers only empty
    /// bodies (every response with a message is then streamed).
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Classifies final statuses (for the [`GrpcOutcome`](super::GrpcOutcome) and the
    /// hook) with `classifier`.
    pub fn with_classifier(mut self, classifier: GrpcClassifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// Calls `hook` with the final outcome of every response.
    pub fn on_status<H2>(self, hook: H2) -> GrpcStatusLayer<H2> {
        GrpcStatusLayer {
            limit: self.limit,
            classifier: self.classifier,
            hook: Arc::new(hook),
            stream_through: self.stream_through,
        }
    }

    /// Never reads the responses of `path` (`/package.Service/Method`, or
    /// `/package.Service/*`) first: they are returned as soon as their headers arrive
    /// and their status is reported to the hook when they end.
    ///
    /// Name every server-streaming (and bidirectional) method here: a stream that
    /// sends small messages for a long time would otherwise be held until it ends, or
    /// until it has sent more than the limit.
    ///
    /// # Errors
    /// A pattern that would match every call or none (`*`, a `*` before the end, no
    /// method, no service, more than two segments) is a [`ConfigError`](crate::error::ConfigError).
    pub fn stream_through(
        mut self,
        path: impl Into<String>,
    ) -> Result<Self, crate::error::ConfigError> {
        let path = path.into();
        crate::http::check_method_pattern("grpc_status.stream_through", &path)?;
        let mut paths = self.stream_through.to_vec();
        paths.push(path);
        self.stream_through = paths.into();
        Ok(self)
    }

    /// The buffer limit, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl<S, H> Layer<S> for GrpcStatusLayer<H> {
    type Service = GrpcStatus<S, H>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcStatus::new(
            inner,
            self.limit,
            self.classifier,
            self.hook.clone(),
            self.stream_through.clone(),
        )
    }
}
