use super::clock::{new_idempotency_key, new_message_id, usable_key, wall_now};
use super::codec::{Captured, RequestCodec};
use super::error::NotEnqueued;
use super::future::DeferFuture;
use super::layer::EnqueueConfig;
use super::policy::{Trigger, path_of, trigger};
use super::receipt::{Receipt, reason_str};
use crate::BoxError;
use crate::classify::Classify;
use crate::queue::{DeferReason, Enqueued, Envelope, Queue, QueueError};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tower_service::Service;

/// Everything one layer's services share.
pub(crate) struct Shared<Q, C> {
    pub(crate) queue: Arc<Q>,
    pub(crate) classifier: C,
    pub(crate) config: EnqueueConfig,
}

/// What was captured of a deferrable request before it was sent.
#[derive(Debug)]
pub(crate) struct Capture {
    pub(crate) key: String,
    head: Head,
    /// When it was captured, on tokio's clock: one cheap read on the happy path; the
    /// wall-clock time is worked out only if the message is deferred.
    captured_at: tokio::time::Instant,
}

/// The request as kept in case the call fails.
#[derive(Debug)]
enum Head {
    /// In envelope form already (the typed flavour's codec made it).
    Captured(Captured),
    /// An HTTP request's method, URI, headers and body, kept as clones that share
    /// their bytes; turned into envelope fields only if the call fails, so the success
    /// path allocates nothing per header.
    #[cfg(feature = "http")]
    Http {
        method: http::Method,
        uri: http::Uri,
        headers: http::HeaderMap,
        body: bytes::Bytes,
    },
}

impl Capture {
    pub(crate) fn new(key: String, captured: Captured) -> Self {
        Self {
            key,
            head: Head::Captured(captured),
            captured_at: tokio::time::Instant::now(),
        }
    }

    /// The capture of an HTTP request with head `parts` and buffered `body`.
    #[cfg(feature = "http")]
    pub(crate) fn http(key: String, parts: &http::request::Parts, body: bytes::Bytes) -> Self {
        Self {
            key,
            head: Head::Http {
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                headers: parts.headers.clone(),
                body,
            },
            captured_at: tokio::time::Instant::now(),
        }
    }
}

impl Capture {
    /// The wall-clock time it was captured at.
    fn created_at(&self) -> SystemTime {
        let now = wall_now();
        now.checked_sub(self.captured_at.elapsed()).unwrap_or(now)
    }
}

impl Head {
    fn into_captured(self) -> Captured {
        match self {
            Head::Captured(captured) => captured,
            #[cfg(feature = "http")]
            Head::Http {
                method,
                uri,
                headers,
                body,
            } => super::codec::http_codec::capture_head(&method, &uri, &headers, body),
        }
    }
}

/// Counts a failure passed through undeferred (`outcome="not_deferred"`).
fn count_not_deferred(reason: DeferReason) {
    metrics::counter!(
        "postbox_calls_total",
        "layer" => "enqueue",
        "outcome" => "not_deferred",
        "reason" => reason_str(reason)
    )
    .increment(1);
}

// === impl Shared ===

impl<Q, C> Shared<Q, C> {
    pub(crate) fn new(queue: Arc<Q>, classifier: C, config: EnqueueConfig) -> Self {
        Self {
            queue,
            classifier,
            config,
        }
    }

    /// The idempotency key to use: the request's own, or a fresh one.
    pub(crate) fn key_or_new(existing: Option<String>) -> String {
        // An empty or blank key is no key (the server's `Idempotency` layer ignores
        // it): a replay carrying it could apply the effect twice.
        existing
            .filter(|k| usable_key(k))
            .unwrap_or_else(new_idempotency_key)
    }
}

impl<Q, C> Shared<Q, C> {
    /// A request kept synchronous only because its body was over `max_body`: if its
    /// outcome would have been deferred, counted as `not_deferred` and logged at
    /// `warn` with the limit, so the requests a body limit leaves unprotected show.
    #[cold]
    pub(crate) fn too_large_to_defer<Res>(&self, outcome: Result<&Res, &BoxError>)
    where
        C: Classify<Res, BoxError>,
    {
        if let Some(t) = trigger(&self.classifier, outcome) {
            tracing::warn!(
                limit = self.config.max_body,
                reason = reason_str(t.reason),
                "request body over the enqueue layer's max_body; failure not deferred"
            );
            count_not_deferred(t.reason);
        }
    }
}

impl<Q: Queue, C> Shared<Q, C> {
    /// When a message captured at `created_at` expires.
    fn expires_at(&self, created_at: SystemTime) -> Option<SystemTime> {
        self.config
            .ttl
            .map(|ttl| crate::queue::saturating_add(created_at, ttl))
    }

    /// How long a message deferred by `trigger` waits before its first replay: the
    /// dependency's hint, capped at `max_retry_after`; an open breaker's own wait.
    fn first_wait(&self, trigger: &Trigger) -> Duration {
        let wait = trigger.not_before.unwrap_or_default();
        match trigger.reason {
            DeferReason::CircuitOpen => wait,
            _ => wait.min(self.config.max_retry_after),
        }
    }

    /// Whether a message deferred by `trigger` could ever be delivered: not if it has
    /// expired already (the call failed after its time to live) or the dependency's
    /// `Retry-After` reaches past its expiry. A receipt would promise a delivery that
    /// can never happen; the caller gets the original outcome instead (the
    /// dependency's `429` with its `Retry-After`, say).
    pub(crate) fn deliverable(&self, capture: &Capture, trigger: &Trigger) -> bool {
        let Some(at) = self.expires_at(capture.created_at()) else {
            return true;
        };
        let wait = self.first_wait(trigger);
        let deliverable = crate::queue::saturating_add(wall_now(), wait) < at;
        if !deliverable {
            tracing::debug!(
                ?wait,
                "expired, or Retry-After past the message's expiry; not deferred"
            );
            count_not_deferred(trigger.reason);
        }
        deliverable
    }

    /// Builds the envelope and starts storing it.
    pub(crate) fn enqueue(
        &self,
        capture: Capture,
        trigger: Trigger,
        original: BoxError,
    ) -> Pending {
        let now = wall_now();
        // A Retry-After of any size (it comes from the dependency) must not overflow.
        let not_before = crate::queue::saturating_add(now, self.first_wait(&trigger));
        let created_at = capture.created_at();
        let Capture { key, head, .. } = capture;
        let expires_at = self.expires_at(created_at);
        let captured = head.into_captured();
        let envelope = Envelope {
            id: new_message_id(),
            idempotency_key: key.clone(),
            created_at,
            not_before,
            expires_at,
            attempts: 0,
            destination: captured.destination,
            method: captured.method,
            uri: captured.uri,
            headers: captured.headers,
            body: captured.body,
            reason: trigger.reason,
        };
        let queue = self.queue.clone();
        Pending {
            store: Box::pin(async move { queue.enqueue(envelope).await }),
            key,
            trigger,
            not_before,
            original: Some(original),
        }
    }
}

impl<Q, C: fmt::Debug> fmt::Debug for Shared<Q, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("classifier", &self.classifier)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

type StoreFuture = Pin<Box<dyn Future<Output = Result<Enqueued, QueueError>> + Send>>;

/// A message being stored; resolves to the receipt or the composite error.
pub(crate) struct Pending {
    store: StoreFuture,
    key: String,
    trigger: Trigger,
    not_before: SystemTime,
    original: Option<BoxError>,
}

impl Pending {
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Receipt, NotEnqueued>> {
        let res = std::task::ready!(self.store.as_mut().poll(cx));
        let reason = self.trigger.reason;
        let original = self
            .original
            .take()
            .expect("enqueue polled after completion");
        Poll::Ready(match res {
            Ok(stored) => {
                let duplicate = matches!(stored, Enqueued::Duplicate(_));
                tracing::info!(
                    id = %stored.id(),
                    reason = reason_str(reason),
                    duplicate,
                    cause = %original,
                    "request deferred to the queue"
                );
                // A duplicate stored nothing: the receipt is the message's held already.
                let outcome = if duplicate { "duplicate" } else { "enqueued" };
                metrics::counter!(
                    "postbox_calls_total",
                    "layer" => "enqueue",
                    "outcome" => outcome,
                    "reason" => reason_str(reason)
                )
                .increment(1);
                Ok(Receipt::new(
                    stored.id(),
                    std::mem::take(&mut self.key),
                    reason,
                    self.not_before,
                    duplicate,
                ))
            }
            Err(queue) => {
                tracing::warn!(
                    reason = reason_str(reason),
                    error = %queue,
                    cause = %original,
                    "request could not be enqueued"
                );
                metrics::counter!(
                    "postbox_calls_total",
                    "layer" => "enqueue",
                    "outcome" => "enqueue_failed",
                    "reason" => reason_str(reason)
                )
                .increment(1);
                Err(NotEnqueued::new(reason, original, queue)
                    .with_key(std::mem::take(&mut self.key)))
            }
        })
    }
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending")
            .field("key", &self.key)
            .field("trigger", &self.trigger)
            .finish_non_exhaustive()
    }
}

/// The typed flavour: defers any `Service<Req>` whose requests a
/// [`RequestCodec<Req>`] can capture; see the [module docs](super).
///
/// The response becomes [`Deferred<S::Response>`](super::Deferred), errors
/// [`BoxError`] (a failed enqueue is [`NotEnqueued`]).
///
/// # Readiness
/// `poll_ready` is the inner service's: a readiness error (a closed `Buffer`, a
/// `Reconnect` that cannot connect) comes before any request and is returned as it
/// is, not deferred. Layers that turn callers away (a breaker, a bulkhead) do it in
/// `call`, so those are deferred. The HTTP flavour, which needs a `Clone` inner
/// service, readies a clone per call and defers readiness errors too.
///
/// # Clone
/// Clones share the queue, classifier, codec and config.
///
/// # Cancel safety
/// Dropping the response future before the inner call completes never enqueues.
/// Dropping it while the message is being stored may or may not store it (no receipt
/// was returned; a replay of it carries the request's idempotency key, harmless to a
/// retry of the caller's only if that retry sends the same key).
pub struct Defer<S, Q, K, C> {
    inner: S,
    shared: Arc<Shared<Q, C>>,
    codec: Arc<K>,
}

// === impl Defer ===

impl<S, Q, K, C> Defer<S, Q, K, C> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<Q, C>>, codec: Arc<K>) -> Self {
        Self {
            inner,
            shared,
            codec,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the layer, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, Q, K, C> Clone for Defer<S, Q, K, C> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.shared.clone(), self.codec.clone())
    }
}

impl<S: fmt::Debug, Q, K, C: fmt::Debug> fmt::Debug for Defer<S, Q, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Defer")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl<S, Q, K, C, Req> Service<Req> for Defer<S, Q, K, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Q: Queue,
    K: RequestCodec<Req>,
    C: crate::classify::Classify<S::Response, BoxError>,
{
    type Response = super::Deferred<S::Response>;
    type Error = BoxError;
    type Future = DeferFuture<S::Future, Q, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let mut too_large = false;
        let capture = self.codec.capture(&req).and_then(|captured| {
            let path = path_of(&captured.uri);
            if !self.shared.config.policy.may_defer(&captured.method, path) {
                return None;
            }
            if captured.body.len() > self.shared.config.max_body {
                tracing::debug!(
                    limit = self.shared.config.max_body,
                    "request body over the limit; not deferrable"
                );
                too_large = true;
                return None;
            }
            let key = Shared::<Q, C>::key_or_new(self.codec.idempotency_key(&req));
            self.codec.set_idempotency_key(&mut req, &key);
            Some(Capture::new(key, captured))
        });
        let fut = DeferFuture::new(self.inner.call(req), capture, self.shared.clone());
        if too_large { fut.body_too_large() } else { fut }
    }
}

#[cfg(feature = "http")]
pub use self::http_flavour::EnqueueFallback;

#[cfg(feature = "http")]
mod http_flavour {
    use super::{Capture, Shared};
    use crate::BoxError;
    use crate::classify::Classify;
    use crate::enqueue::BufferedBody;
    use crate::enqueue::codec::http_codec::{
        has_unreadable_key, key_of, opens_a_connection, send_key,
    };
    use crate::enqueue::future::ResponseFuture;
    use crate::queue::Queue;
    use bytes::Bytes;
    use http::{Request, Response};
    use http_body::Body;
    use std::fmt;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use tower_service::Service;

    /// The HTTP flavour: on a failure that may be deferred, stores the request and
    /// answers `202 Accepted`; see the [module docs](crate::enqueue).
    ///
    /// The caller's body `B` must be an `http_body::Body + Unpin` (hyper's `Incoming`,
    /// axum's `Body`, `Full`, `BoxBody`; wrap others in `Box::pin`). The inner service
    /// receives `http::Request<BufferedBody<B>>`: a body within the limit fully
    /// buffered, a larger one streamed through. The response type is the
    /// inner one, `http::Response<ResBody>`; a receipt is built with
    /// `ResBody::default()`, hence the `ResBody: Default` bound (axum's `Body`,
    /// `Full<Bytes>`, `Empty<Bytes>`, `BoxBody` all qualify). Errors become
    /// [`BoxError`]; a failed enqueue is
    /// [`NotEnqueued`](crate::enqueue::error::NotEnqueued).
    ///
    /// # Readiness and `Clone`
    /// The layer is always ready, and the inner service must be `Clone`: each response
    /// future readies a clone of its own (tower's `Oneshot` pattern), after reading the
    /// body when it has to. A slow upload so holds no bulkhead permit or half-open probe
    /// of the layers inside, and a deadline outside also bounds the wait for readiness.
    /// Clones share the queue, classifier and config.
    ///
    /// # Cancel safety
    /// Dropping the response future before the inner call completes never enqueues.
    /// Dropping it while the message is being stored may or may not store it (no
    /// receipt was returned; a replay of it carries the request's idempotency key,
    /// harmless to a retry of the caller's only if that retry sends the same key).
    pub struct EnqueueFallback<S, Q, C> {
        inner: S,
        shared: Arc<Shared<Q, C>>,
    }

    // === impl EnqueueFallback ===

    impl<S, Q, C> EnqueueFallback<S, Q, C> {
        pub(crate) fn new(inner: S, shared: Arc<Shared<Q, C>>) -> Self {
            Self { inner, shared }
        }

        /// The inner service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The inner service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Consumes the layer, returning the inner service.
        pub fn into_inner(self) -> S {
            self.inner
        }
    }

    impl<S: Clone, Q, C> Clone for EnqueueFallback<S, Q, C> {
        fn clone(&self) -> Self {
            Self::new(self.inner.clone(), self.shared.clone())
        }
    }

    impl<S: fmt::Debug, Q, C: fmt::Debug> fmt::Debug for EnqueueFallback<S, Q, C> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("EnqueueFallback")
                .field("inner", &self.inner)
                .field("shared", &self.shared)
                .finish()
        }
    }

    impl<S, Q, C, B, ResBody> Service<Request<B>> for EnqueueFallback<S, Q, C>
    where
        S: Service<Request<BufferedBody<B>>, Response = Response<ResBody>> + Clone,
        S::Error: Into<BoxError>,
        B: Body + Unpin,
        B::Error: Into<BoxError>,
        ResBody: Default,
        Q: Queue,
        C: Classify<Response<ResBody>, BoxError>,
    {
        type Response = Response<ResBody>;
        type Error = BoxError;
        type Future = ResponseFuture<S, B, Q, C>;

        /// Always ready: the response future readies a clone of the inner service,
        /// after reading the body when it has to (see [`EnqueueFallback`]).
        #[inline]
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<B>) -> Self::Future {
            let (mut parts, body) = req.into_parts();
            let config = &self.shared.config;
            let shared = self.shared.clone();
            // A gRPC call is never deferred: a `202` is not a gRPC answer, and a
            // streaming call's body ends only after its answer begins (read first to
            // be stored, it would hang). See the module docs for deferring gRPC. Nor
            // is a Connect-protocol call, for the same reasons.
            if !config
                .policy
                .may_defer(parts.method.as_str(), parts.uri.path())
                || opens_a_connection(&parts.method, &parts.headers)
                || crate::http::is_grpc(&parts.headers)
                || crate::http::is_connect(&parts.headers)
                || has_unreadable_key(&parts.headers)
            {
                // Kept synchronous. An empty body (a `GET`) goes as one a retry inside can
                // send again; any other is streamed through.
                let body = if body.is_end_stream() {
                    BufferedBody::empty()
                } else {
                    BufferedBody::streaming(body).into_upload()
                };
                let req = Request::from_parts(parts, body);
                return ResponseFuture::readying(self.inner.clone(), req, None, shared);
            }
            // A key made here (or the first of several given) is sent only with a
            // request that may be deferred (its body kept): one that goes out as it is
            // keeps its headers, or the key would make it retry-safe for a retry
            // outside, and a server that ignores keys could apply it twice.
            let (key, made) = match key_of(&parts.headers) {
                Some(key) => (key, false),
                None => (super::new_idempotency_key(), true),
            };
            if body.size_hint().lower() > config.max_body as u64 {
                tracing::debug!(
                    limit = config.max_body,
                    "request body over the limit; not deferrable"
                );
                let req = Request::from_parts(parts, BufferedBody::streaming(body).into_upload());
                return ResponseFuture::readying(self.inner.clone(), req, None, shared)
                    .body_too_large();
            }
            if body.is_end_stream() {
                send_key(&mut parts.headers, &key, made);
                let capture = Capture::http(key, &parts, Bytes::new());
                let req = Request::from_parts(parts, BufferedBody::empty());
                return ResponseFuture::readying(self.inner.clone(), req, Some(capture), shared);
            }
            // The body is read first, and only then is the clone readied: a slow upload
            // holds no bulkhead permit or half-open probe of the layers inside.
            ResponseFuture::collecting(self.inner.clone(), parts, body, (key, made), shared)
        }
    }
}
