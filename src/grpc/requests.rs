use crate::http::body::TryCloneBody;
use crate::http::idempotency_key::has_idempotency_key;
use crate::retry::{CloneRequest, HttpRequests};
use http::Request;

/// How the [retry layer](crate::retry) replays gRPC calls and which ones it may repeat.
///
/// Every gRPC call is a `POST`, so [`HttpRequests`]' rule (idempotent methods) never
/// holds and the method name is in the path, which that rule does not see. Here a call
/// is retry-safe when its path is one named with [`idempotent`](Self::idempotent)
/// (`/package.Service/Method`, or `/package.Service/*` for a whole service), when
/// [`all_idempotent`](Self::all_idempotent) says so, or when it carries an
/// `Idempotency-Key`. As in gRPC's own retry policy, naming the safe methods is the
/// service owner's choice. A failure that certainly had no effect (a refused connection,
/// an open breaker) is retried whatever this says.
///
/// Requests are copied like [`HttpRequests`] copies them: the body must be replayable
/// (put [`BufferBodyLayer`](crate::http::body::BufferBodyLayer) outside the retry).
///
/// # Example
/// ```
/// use postbox::classify::GrpcClassifier;
/// use postbox::grpc::GrpcRequests;
/// use postbox::retry::RetryLayer;
///
/// # fn main() -> Result<(), postbox::error::ConfigError> {
/// let retry = RetryLayer::http()
///     .classifier(GrpcClassifier::new())
///     .requests(GrpcRequests::new().idempotent("/echo.Echo/Say").idempotent("/shop.Catalog/*"))
///     .build()?;
/// # let _ = retry; Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct GrpcRequests {
    /// Copies requests and holds the [`idempotent`](Self::idempotent) patterns.
    copy: HttpRequests,
    all: bool,
}

// === impl GrpcRequests ===

impl GrpcRequests {
    /// No method is retry-safe (only failures that had no effect are retried).
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `path` (`/package.Service/Method`, or `/package.Service/*`) safe to repeat.
    ///
    /// A pattern that can match no call as meant (no method, a `*` before the end, more
    /// than two segments, or one that would match every call: use
    /// [`all_idempotent`](Self::all_idempotent)) is kept but logged at `warn`;
    /// [`try_idempotent`](Self::try_idempotent) refuses it.
    pub fn idempotent(self, path: impl Into<String>) -> Self {
        let path = path.into();
        crate::http::warn_unless_method_pattern("grpc_requests.idempotent", &path);
        self.with_path(path)
    }

    /// As [`idempotent`](Self::idempotent), but a pattern that can match no call as
    /// meant is an error.
    ///
    /// # Errors
    /// A [`ConfigError`](crate::error::ConfigError) naming what is wrong with `path`.
    pub fn try_idempotent(
        self,
        path: impl Into<String>,
    ) -> Result<Self, crate::error::ConfigError> {
        let path = path.into();
        crate::http::check_method_pattern("grpc_requests.idempotent", &path)?;
        Ok(self.with_path(path))
    }

    fn with_path(mut self, path: String) -> Self {
        self.copy = self.copy.with_grpc_method(path);
        self
    }

    /// Marks every method safe to repeat.
    pub fn all_idempotent(mut self) -> Self {
        self.all = true;
        self
    }
}

impl<B: TryCloneBody> CloneRequest<Request<B>> for GrpcRequests {
    fn clone_request(&self, req: &Request<B>) -> Option<Request<B>> {
        self.copy.clone_request(req)
    }

    fn is_retry_safe(&self, req: &Request<B>) -> bool {
        self.all
            || self.copy.names_grpc_method(req.uri().path())
            || has_idempotency_key(req.headers())
    }

    /// Anchors a `grpc-timeout` the caller set (tonic's `Request::set_timeout`) as the
    /// call's deadline, as [`HttpRequests`](crate::retry::HttpRequests) does: without
    /// it, every retry got the whole timeout again, and retries started after it.
    fn prepare(&self, req: &mut Request<B>) {
        self.copy.prepare(req);
    }

    fn before_retry(&self, req: &mut Request<B>) {
        self.copy.before_retry(req);
    }

    fn after_attempt(&self, req: &Request<B>, class: &crate::classify::Classification) {
        self.copy.after_attempt(req, class);
    }

    fn deadline(&self, req: &Request<B>) -> Option<tokio::time::Instant> {
        self.copy.deadline(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(path: &str) -> Request<()> {
        Request::post(format!("http://a{path}")).body(()).unwrap()
    }

    /// A pattern with a typo (no method, a `*` inside, a whole-path wildcard) would
    /// silently make no method retry-safe: `try_idempotent` refuses it.
    #[test]
    fn try_idempotent_refuses_a_pattern_that_names_no_method() {
        for bad in [
            "/pkg.Svc/",
            "pkg.Svc",
            "/pkg.Svc/Get*x",
            "/*",
            "/a/pkg.Svc/Get",
        ] {
            let e = GrpcRequests::new().try_idempotent(bad).unwrap_err();
            assert_eq!(e.field(), "grpc_requests.idempotent", "{bad}");
        }
        let r = GrpcRequests::new()
            .try_idempotent("/pkg.Svc/Get")
            .unwrap()
            .try_idempotent("/shop.Catalog/*")
            .unwrap();
        assert!(r.is_retry_safe(&call("/pkg.Svc/Get")));
        assert!(r.is_retry_safe(&call("/shop.Catalog/List")));
        assert!(!r.is_retry_safe(&call("/pkg.Svc/Put")));
    }

    /// A replayed gRPC call notes an attempt that reached the dependency, as an HTTP
    /// one does (the replayer counts such a replay even if its retry then met the open
    /// breaker).
    #[test]
    fn an_attempt_that_reached_the_dependency_is_noted() {
        use crate::classify::Classification;
        let log = crate::retry::AttemptLog::new();
        let mut req = call("/echo.Echo/Say");
        req.extensions_mut().insert(log.clone());
        let r = GrpcRequests::new();
        r.after_attempt(&req, &Classification::ignored().with_retryable(true));
        assert!(!log.reached());
        r.after_attempt(&req, &Classification::failure());
        assert!(log.reached());
    }

    #[test]
    fn named_methods_and_services_are_retry_safe() {
        let r = GrpcRequests::new()
            .idempotent("/echo.Echo/Say")
            .idempotent("/shop.Catalog/*");
        assert!(r.is_retry_safe(&call("/echo.Echo/Say")));
        assert!(!r.is_retry_safe(&call("/echo.Echo/Shout")));
        assert!(r.is_retry_safe(&call("/shop.Catalog/List")));
        assert!(!GrpcRequests::new().is_retry_safe(&call("/echo.Echo/Say")));
        assert!(
            GrpcRequests::new()
                .all_idempotent()
                .is_retry_safe(&call("/x.Y/Z"))
        );
    }

    /// The deadline a `DeadlineLayer::http` outside put on a gRPC call is seen by the
    /// retry layer, and a retry rewrites `grpc-timeout` with the time left.
    #[tokio::test(start_paused = true)]
    async fn a_retry_of_a_grpc_call_sees_its_deadline_and_sends_the_time_left() {
        use crate::timeout::CallDeadline;
        let at = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut req = call("/echo.Echo/Say");
        req.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        req.headers_mut()
            .insert("grpc-timeout", "2000000u".parse().unwrap());
        req.extensions_mut().insert(CallDeadline::new(at));
        let r = GrpcRequests::new();
        assert_eq!(r.deadline(&req), Some(at));
        tokio::time::advance(std::time::Duration::from_millis(1500)).await;
        r.before_retry(&mut req);
        assert_eq!(req.headers()["grpc-timeout"], "500000u");
    }

    #[test]
    fn an_idempotency_key_makes_a_call_retry_safe() {
        let mut req = call("/echo.Echo/Shout");
        req.headers_mut()
            .insert("idempotency-key", "k1".parse().unwrap());
        assert!(GrpcRequests::new().is_retry_safe(&req));
    }
}
