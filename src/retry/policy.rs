//! What a retry needs to know about requests, and the hook called before every retry.

use super::backoff::{Backoff, JitterRng};
use super::budget::RetryBudget;
use crate::classify::Classification;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// How the retry layer copies a request for another attempt and decides whether
/// sending it twice is safe.
///
/// Implemented by [`Cloned`] (any `Clone` request, all retry-safe) and, with the `http`
/// feature, by `HttpRequests` (`http::Request<B>` for any replayable body, retry-safe
/// by method or `Idempotency-Key`). A type of your own takes one `impl` block.
pub trait CloneRequest<Req> {
    /// A copy of `req` for another attempt, or `None` if it cannot be replayed (then it
    /// is sent once). Asked again before each retry but the last (which sends `req`
    /// itself): a `None` then makes that retry the last, sending `req`, which was never
    /// sent, so its body must not share what the copies sent before consumed.
    fn clone_request(&self, req: &Req) -> Option<Req>;

    /// Whether `req` may be sent again after an attempt that may have taken effect.
    ///
    /// A failure that certainly had no effect (a refused connection, an open breaker)
    /// is retried whatever this says.
    fn is_retry_safe(&self, req: &Req) -> bool;

    /// Called once before the first attempt, e.g. to add an `Idempotency-Key`.
    #[inline]
    fn prepare(&self, req: &mut Req) {
        let _ = req;
    }

    /// Called on the request of every retry (not the first attempt) just before it is
    /// sent, e.g. to refresh the time left that deadline headers tell the next hop.
    #[inline]
    fn before_retry(&self, req: &mut Req) {
        let _ = req;
    }

    /// Called after an attempt the layer is about to retry, with the original request
    /// and the attempt's classification; e.g. to note on a request carrying an
    /// [`AttemptLog`] that an attempt reached the dependency. Off the happy path.
    #[inline]
    fn after_attempt(&self, req: &Req, class: &Classification) {
        let _ = (req, class);
    }

    /// When the call `req` belongs to must be done, if it carries a deadline: no retry
    /// is started that could not begin before it (the last outcome is returned
    /// instead). Only asked after a retryable failure.
    #[inline]
    fn deadline(&self, req: &Req) -> Option<tokio::time::Instant> {
        let _ = req;
        None
    }
}

/// A shared note, carried in a request's extensions, of whether an attempt the retry
/// layer retried reached the dependency: its outcome was recorded (a failure, an
/// overload), not turned away by our own breaker or bulkhead
/// ([`Class::Ignored`](crate::classify::Class::Ignored)).
///
/// The [`Replayer`](crate::enqueue::Replayer) runs every replay with one (the retry
/// layer notes on it whatever the request type) and puts it on every replayed HTTP
/// request too (so it also works behind a `Buffer`):
/// a replay whose retries end on the breaker its own failed attempt opened then counts
/// towards `max_attempts`, instead of being put back uncounted as if it had never
/// reached the dependency (a message that always fails was replayed for ever).
/// `HttpRequests` and `GrpcRequests` mark it (a [`CloneRequest`] of your own does in
/// [`after_attempt`](CloneRequest::after_attempt)); clones of the request share it.
#[derive(Debug, Clone, Default)]
pub struct AttemptLog(Arc<std::sync::atomic::AtomicBool>);

impl AttemptLog {
    /// A log with nothing noted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes that an attempt reached the dependency.
    pub fn note_reached(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether an attempt reached the dependency.
    pub fn reached(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

tokio::task_local! {
    /// The [`AttemptLog`] of the replay running in this task (set by the replayer):
    /// the retry layer notes on it whatever the request type, as long as it runs in
    /// the replay's task (not behind a `Buffer`, whose worker is another task: there
    /// the request's own log, in its extensions, still works).
    static TASK_LOG: AttemptLog;
}

impl AttemptLog {
    /// Runs `fut` with this log as its task's: a retry layer polled inside notes on
    /// it, whatever the request type.
    pub(crate) async fn scope<F: std::future::Future>(self, fut: F) -> F::Output {
        TASK_LOG.scope(self, fut).await
    }

    /// Notes on the running task's log, if any, that an attempt classified `class`
    /// reached the dependency.
    pub(crate) fn note_in_task(class: &Classification) {
        if !class.is_ignored() {
            let _ = TASK_LOG.try_with(AttemptLog::note_reached);
        }
    }
}

/// Retries any `Clone` request, cloning it for every attempt but the last; every
/// request is considered retry-safe (tower's `Retry` semantics).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cloned {
    _priv: (),
}

impl Cloned {
    /// The strategy.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<Req: Clone> CloneRequest<Req> for Cloned {
    #[inline]
    fn clone_request(&self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }

    #[inline]
    fn is_retry_safe(&self, _: &Req) -> bool {
        true
    }
}

#[cfg(feature = "http")]
pub use self::http_requests::HttpRequests;

#[cfg(feature = "http")]
mod http_requests {
    use super::CloneRequest;
    use crate::classify::Classification;
    use crate::http::body::{BodyNotReplayable, TryCloneBody};
    use crate::http::idempotency_key::{self, ensure_idempotency_key};
    use http::{HeaderMap, Method, Request};
    use std::fmt;
    use std::sync::Arc;

    type SafeFn = dyn Fn(&Method, &HeaderMap) -> bool + Send + Sync;

    /// Retries `http::Request<B>`s whose body can be replayed.
    ///
    /// * A request is copied with its method, URI, version, headers, extensions and a
    ///   [`try_clone_body`](TryCloneBody::try_clone_body) of its body. Every `Clone`
    ///   body qualifies; a [`ReplayBody`](crate::http::body::ReplayBody) qualifies when it
    ///   was buffered. A request marked [`BodyNotReplayable`] is sent once.
    /// * By default a request is retry-safe when its method is idempotent (`GET`,
    ///   `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`) or it carries an
    ///   `Idempotency-Key`; [`retry_safe_if`](Self::retry_safe_if) replaces the rule.
    /// * [`generate_idempotency_key`](Self::generate_idempotency_key) adds a key to
    ///   requests that are not otherwise retry-safe, so they become retryable (the
    ///   receiving service must de-duplicate on it).
    ///
    /// gRPC calls are all `POST`s: with a [`GrpcClassifier`](crate::classify::GrpcClassifier)
    /// they are retried only after failures that had no effect, unless they carry a key
    /// or [`idempotent_grpc_method`](Self::idempotent_grpc_method) names the methods that
    /// are safe to repeat (gRPC's own retry policy leaves that choice to the service
    /// owner too).
    #[derive(Clone, Default)]
    pub struct HttpRequests {
        safe: Option<Arc<SafeFn>>,
        /// [`idempotent_grpc_method`](Self::idempotent_grpc_method) patterns.
        grpc_methods: Arc<[String]>,
        generate_key: bool,
        /// [`retry_every_method`](Self::retry_every_method).
        every_method: bool,
    }

    // === impl HttpRequests ===

    impl HttpRequests {
        /// The default rules (see above).
        pub fn new() -> Self {
            Self::default()
        }

        /// Adds a generated `Idempotency-Key` to every request that is not retry-safe
        /// before its first attempt (under [`retry_every_method`](Self::retry_every_method),
        /// to every request whose method is not idempotent), but one carrying a key that
        /// is not ASCII: that key is kept as the caller sent it, and the request stays
        /// not retry-safe (see [`ensure_idempotency_key`]).
        pub fn generate_idempotency_key(mut self, generate: bool) -> Self {
            self.generate_key = generate;
            self
        }

        /// Retries every request, whatever its method: for a service that de-duplicates
        /// retries itself. With [`generate_idempotency_key`](Self::generate_idempotency_key),
        /// a request whose method is not idempotent still gets its key, which such a
        /// service needs to de-duplicate (a rule `retry_safe_if(|_, _| true)` adds none:
        /// every request is safe by it). Replaces any [`retry_safe_if`](Self::retry_safe_if)
        /// rule.
        pub fn retry_every_method(mut self) -> Self {
            self.safe = Some(Arc::new(|_: &Method, _: &HeaderMap| true));
            self.every_method = true;
            self
        }

        /// Marks the gRPC method `pattern` names (`/package.Service/Method`, or
        /// `/package.Service/*` for a whole service) safe to repeat, whatever the rule
        /// for HTTP methods says: a gRPC call through an HTTP stack is a `POST`, so it is
        /// otherwise retried only after failures that had no effect. The pattern is
        /// matched against the request's path, as
        /// [`GrpcRequests::idempotent`](crate::grpc::GrpcRequests::idempotent) matches it.
        ///
        /// A pattern that can match no call as meant (no method, a `*` before the end,
        /// more than two segments, or one that would match every call: use
        /// [`retry_every_method`](Self::retry_every_method)) is kept but logged at `warn`;
        /// [`try_idempotent_grpc_method`](Self::try_idempotent_grpc_method) refuses it.
        pub fn idempotent_grpc_method(self, pattern: impl Into<String>) -> Self {
            let pattern = pattern.into();
            crate::http::warn_unless_method_pattern("idempotent_grpc_method", &pattern);
            self.with_grpc_method(pattern)
        }

        /// As [`idempotent_grpc_method`](Self::idempotent_grpc_method), but a pattern that
        /// can match no call as meant is an error.
        ///
        /// # Errors
        /// A [`ConfigError`](crate::error::ConfigError) naming what is wrong with `pattern`.
        pub fn try_idempotent_grpc_method(
            self,
            pattern: impl Into<String>,
        ) -> Result<Self, crate::error::ConfigError> {
            let pattern = pattern.into();
            crate::http::check_method_pattern("idempotent_grpc_method", &pattern)?;
            Ok(self.with_grpc_method(pattern))
        }

        pub(crate) fn with_grpc_method(mut self, pattern: String) -> Self {
            let mut methods = self.grpc_methods.to_vec();
            methods.push(pattern);
            self.grpc_methods = methods.into();
            self
        }

        /// Whether an [`idempotent_grpc_method`](Self::idempotent_grpc_method) pattern
        /// names the call to `path`.
        pub(crate) fn names_grpc_method(&self, path: &str) -> bool {
            self.grpc_methods
                .iter()
                .any(|p| crate::http::names_method(p, path))
        }

        /// Replaces the retry-safety rule (e.g. `|_, _| true` retries every method).
        /// Methods named by [`idempotent_grpc_method`](Self::idempotent_grpc_method)
        /// stay safe.
        pub fn retry_safe_if<F>(mut self, f: F) -> Self
        where
            F: Fn(&Method, &HeaderMap) -> bool + Send + Sync + 'static,
        {
            self.safe = Some(Arc::new(f));
            self.every_method = false;
            self
        }

        fn safe(&self, method: &Method, headers: &HeaderMap) -> bool {
            match &self.safe {
                Some(f) => f(method, headers),
                None => idempotency_key::is_retry_safe(method, headers),
            }
        }
    }

    impl fmt::Debug for HttpRequests {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("HttpRequests")
                .field("custom_rule", &self.safe.is_some())
                .field("grpc_methods", &self.grpc_methods)
                .field("generate_idempotency_key", &self.generate_key)
                .field("every_method", &self.every_method)
                .finish()
        }
    }

    impl<B: TryCloneBody> CloneRequest<Request<B>> for HttpRequests {
        fn clone_request(&self, req: &Request<B>) -> Option<Request<B>> {
            if BodyNotReplayable::is_marked(req) {
                return None;
            }
            let body = req.body().try_clone_body()?;
            let mut copy = Request::new(body);
            *copy.method_mut() = req.method().clone();
            *copy.uri_mut() = req.uri().clone();
            *copy.version_mut() = req.version();
            *copy.headers_mut() = req.headers().clone();
            *copy.extensions_mut() = req.extensions().clone();
            Some(copy)
        }

        fn is_retry_safe(&self, req: &Request<B>) -> bool {
            // A key this policy added makes the request retryable whatever the rule:
            // a custom rule need not know about keys.
            self.safe(req.method(), req.headers())
                || self.names_grpc_method(req.uri().path())
                || (self.generate_key && idempotency_key::has_idempotency_key(req.headers()))
        }

        fn after_attempt(&self, req: &Request<B>, class: &Classification) {
            if !class.is_ignored()
                && let Some(log) = req.extensions().get::<super::AttemptLog>()
            {
                log.note_reached();
            }
        }

        /// Adds the generated key, and anchors a timeout the caller set only in a
        /// header (`grpc-timeout`, as tonic's `Request::set_timeout` writes, or
        /// `postbox-timeout-ms`) as the call's [`CallDeadline`](crate::timeout::CallDeadline)
        /// from now: retries then send the time left, not the whole timeout again, and
        /// none starts after it.
        fn prepare(&self, req: &mut Request<B>) {
            // Retrying every method is for services that de-duplicate, and they need the
            // key of a request whose method is not idempotent to.
            let unsafe_method =
                self.every_method && !idempotency_key::is_retry_safe(req.method(), req.headers());
            if self.generate_key
                && (unsafe_method
                    || !(self.safe(req.method(), req.headers())
                        || self.names_grpc_method(req.uri().path())))
            {
                ensure_idempotency_key(req);
            }
            crate::timeout::anchor_caller_timeout(req);
        }

        /// Rewrites the deadline headers the first attempt carried (`postbox-timeout-ms`,
        /// `grpc-timeout`, written by a `DeadlineLayer::http` outside or by the caller)
        /// with the time left now, so the next hop does not believe it has the whole
        /// budget again. A header the first attempt did not carry is not added.
        fn before_retry(&self, req: &mut Request<B>) {
            use crate::timeout::CallDeadline;
            if let Some(at) = req.extensions().get::<CallDeadline>().map(CallDeadline::at) {
                crate::timeout::rewrite_deadline_headers(req, at);
            }
        }

        /// The [`CallDeadline`](crate::timeout::CallDeadline) a `DeadlineLayer::http`
        /// outside put on the request.
        fn deadline(&self, req: &Request<B>) -> Option<tokio::time::Instant> {
            req.extensions()
                .get::<crate::timeout::CallDeadline>()
                .map(crate::timeout::CallDeadline::at)
        }
    }
}

/// One retry about to be made, as seen by an [`OnRetry`] hook.
#[derive(Debug, Clone, Copy)]
pub struct RetryEvent {
    pub(crate) attempt: u32,
    pub(crate) delay: Duration,
    pub(crate) reason: Classification,
}

impl RetryEvent {
    /// The number of the attempt about to be made: 2 for the first retry.
    pub const fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How long the layer waits before it (backoff or server hint).
    pub const fn delay(&self) -> Duration {
        self.delay
    }

    /// The classification of the failed attempt that caused it.
    pub const fn reason(&self) -> Classification {
        self.reason
    }
}

/// Called before every retry (tower-http hook shape): implemented for `()` (nothing)
/// and for closures `Fn(&RetryEvent)`.
pub trait OnRetry {
    /// A retry is about to be scheduled.
    fn on_retry(&self, event: &RetryEvent);
}

impl OnRetry for () {
    #[inline]
    fn on_retry(&self, _: &RetryEvent) {}
}

impl<F: Fn(&RetryEvent)> OnRetry for F {
    #[inline]
    fn on_retry(&self, event: &RetryEvent) {
        self(event)
    }
}

/// The validated retry policy a [`RetryLayer`](super::RetryLayer) gives each service:
/// the classifier `C`, the request strategy `R`, the hook `H`, and the limits.
///
/// Built by [`RetryBuilder`](super::RetryBuilder); cloned into every response future, so
/// it is cheap to clone (the budget is an `Arc`).
#[derive(Clone)]
pub struct RetryPolicy<C, R, H> {
    pub(crate) classifier: C,
    pub(crate) requests: R,
    pub(crate) on_retry: H,
    pub(crate) max_retries: u32,
    pub(crate) backoff: Backoff,
    pub(crate) max_retry_after: Duration,
    pub(crate) max_open_wait: Duration,
    pub(crate) budget: Option<RetryBudget>,
    pub(crate) rng: JitterRng,
}

impl<C, R, H> RetryPolicy<C, R, H> {
    /// Retries after the first attempt: `max_retries(3)` means up to 4 attempts in all.
    pub const fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// The backoff.
    pub const fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The longest server hint honoured; a longer one ends the retries.
    pub const fn max_retry_after(&self) -> Duration {
        self.max_retry_after
    }

    /// The longest wait for an open breaker inside; a longer break ends the retries.
    pub const fn max_open_wait(&self) -> Duration {
        self.max_open_wait
    }

    /// The shared budget, if any.
    pub const fn budget(&self) -> Option<&RetryBudget> {
        self.budget.as_ref()
    }

    /// The classifier.
    pub const fn classifier(&self) -> &C {
        &self.classifier
    }

    /// The request strategy.
    pub const fn requests(&self) -> &R {
        &self.requests
    }
}

impl<C: fmt::Debug, R: fmt::Debug, H> fmt::Debug for RetryPolicy<C, R, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("classifier", &self.classifier)
            .field("requests", &self.requests)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .field("max_retry_after", &self.max_retry_after)
            .field("max_open_wait", &self.max_open_wait)
            .field("budget", &self.budget)
            .field("rng", &self.rng)
            .finish_non_exhaustive()
    }
}

/// Rounds a server hint up to the next whole millisecond (tokio's timer resolution), so
/// a sleep of the result is never shorter than the hint.
pub(crate) fn ceil_millis(d: Duration) -> Duration {
    let sub = d.subsec_nanos() % 1_000_000;
    if sub == 0 {
        d
    } else {
        d.saturating_add(Duration::from_nanos(u64::from(1_000_000 - sub)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only an attempt that reached the dependency is noted: a rejection by our own
    /// breaker or bulkhead (ignored) is not, so a replay rejected before any call stays
    /// uncounted. Clones of the request share the log.
    #[cfg(feature = "http")]
    #[test]
    fn the_attempt_log_notes_only_attempts_that_reached_the_dependency() {
        let requests = HttpRequests::new();
        let log = AttemptLog::new();
        let mut req = http::Request::new(crate::enqueue::BufferedBody::<String>::empty());
        req.extensions_mut().insert(log.clone());
        let copy = requests.clone_request(&req).unwrap();
        requests.after_attempt(&copy, &Classification::ignored().with_retryable(true));
        assert!(!log.reached(), "a rejection by our own breaker was noted");
        requests.after_attempt(&copy, &Classification::failure());
        assert!(log.reached());
    }

    /// A gRPC method named idempotent is retry-safe whatever the rule for HTTP methods
    /// (even one that names none), and gets no generated key: it needs none. Another
    /// method of the same service is not safe, and gets its key.
    #[cfg(feature = "http")]
    #[test]
    fn a_grpc_method_named_idempotent_is_retry_safe_without_a_key() {
        let requests = HttpRequests::new()
            .generate_idempotency_key(true)
            .retry_safe_if(|_, _| false)
            .idempotent_grpc_method("/echo.Echo/Say");
        let call = |path: &str| {
            http::Request::post(format!("http://a{path}"))
                .body(())
                .unwrap()
        };
        let mut say = call("/echo.Echo/Say");
        requests.prepare(&mut say);
        assert!(requests.is_retry_safe(&say));
        assert!(!say.headers().contains_key("idempotency-key"));
        let mut shout = call("/echo.Echo/Shout");
        requests.prepare(&mut shout);
        assert!(shout.headers().contains_key("idempotency-key"));
        let unkeyed = HttpRequests::new().idempotent_grpc_method("/echo.Echo/Say");
        assert!(!unkeyed.is_retry_safe(&call("/echo.Echo/Shout")));
        assert!(
            HttpRequests::new()
                .try_idempotent_grpc_method("/echo.Echo/")
                .is_err()
        );
    }

    #[test]
    fn hints_round_up_to_the_millisecond() {
        assert_eq!(
            ceil_millis(Duration::from_millis(2000)),
            Duration::from_millis(2000)
        );
        assert_eq!(
            ceil_millis(Duration::from_nanos(1)),
            Duration::from_millis(1)
        );
        assert_eq!(
            ceil_millis(Duration::from_micros(1_999_001)),
            Duration::from_millis(2000)
        );
    }
}
