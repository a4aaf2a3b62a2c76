use super::service::{Config, Idempotency};
use super::store::MemoryStore;
use crate::enqueue::IDEMPOTENCY_KEY_HEADER;
use crate::error::ConfigError;
use http::HeaderName;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tower_layer::Layer;

/// Applies [`Idempotency`]; every service it makes shares one store.
///
/// Defaults: header `idempotency-key`, responses remembered for 25 hours (an hour past
/// the 24 hours a deferred request may wait in a client's queue, so a replay started
/// just before its message expires still finds the key), a claim
/// abandoned after 60 seconds, response bodies up to 1 MiB remembered.
pub struct IdempotencyLayer<St = MemoryStore> {
    store: Arc<St>,
    config: Config,
}

// === impl IdempotencyLayer ===

impl IdempotencyLayer {
    /// Remembers responses in a [`MemoryStore`] of at most `capacity` remembered
    /// responses (claims in progress come on top).
    pub fn new(capacity: usize) -> Self {
        Self::with_store(Arc::new(MemoryStore::new(capacity)))
    }
}

impl<St> IdempotencyLayer<St> {
    /// Remembers responses in `store`.
    pub fn with_store(store: Arc<St>) -> Self {
        Self {
            store,
            config: Config {
                header: HeaderName::from_static(IDEMPOTENCY_KEY_HEADER),
                ttl: Duration::from_secs(25 * 60 * 60),
                lock_for: Duration::from_secs(60),
                max_body: 1024 * 1024,
                scope: Arc::from([]),
                stream_through: Vec::new(),
                require_key: false,
            },
        }
    }

    /// How long a response is remembered.
    ///
    /// # Errors
    /// A zero `ttl` is a [`ConfigError`].
    pub fn ttl(mut self, ttl: Duration) -> Result<Self, ConfigError> {
        if ttl.is_zero() {
            return Err(ConfigError::new(
                "idempotency.ttl",
                "must be greater than zero",
            ));
        }
        self.config.ttl = ttl;
        Ok(self)
    }

    /// How long a claim lasts: a claim not completed by then (a crashed process, or a
    /// handler still running after its client went away) is given to the next request.
    /// While the client waits, the layer renews the claim, so a slow handler keeps its
    /// key (with a store that can renew: [`IdempotencyStore::extend`](super::IdempotencyStore::extend)). A duplicate waits at most this long in all for the
    /// key (however often it is claimed again), then is answered `409 Conflict`. Keep it
    /// above the handler's timeout.
    ///
    /// # Errors
    /// A zero duration is a [`ConfigError`].
    pub fn lock_for(mut self, d: Duration) -> Result<Self, ConfigError> {
        if d.is_zero() {
            return Err(ConfigError::new(
                "idempotency.lock_for",
                "must be greater than zero",
            ));
        }
        self.config.lock_for = d;
        Ok(self)
    }

    /// Responses with bodies up to `bytes` are remembered; larger ones stream through
    /// and are not (a duplicate then runs the handler again).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.config.max_body = bytes;
        self
    }

    /// Scopes keys by the caller's `header` too (`authorization`, or a tenant header
    /// your authentication sets): two callers who send the same key (a client bug, or
    /// keys like `order-7`) then get their own answers, instead of the second being
    /// answered with the first's response (its body and `Set-Cookie` included). The
    /// value enters the key as a stable 64-bit hash (the same in every instance and
    /// build), so the store does not hold it in the clear; the hash is not
    /// cryptographic, so scope by a high-entropy value (a token) or an identity your
    /// authentication has checked, not by something a caller can choose freely.
    ///
    /// Called again, keys are scoped by each header given (`authorization` and the
    /// account header that picks one of its organisations): the same caller acting for
    /// another account is another scope. A repeated header counts with every value, as
    /// HTTP/1.1 would join them (HTTP/2 sends each cookie as a field of its own).
    ///
    /// Off by default: a caller that retries with a refreshed token then has another
    /// scope, and its retry runs the handler again. The enqueue replayer replays the
    /// stored `Authorization`, so its replays stay in the original's scope.
    pub fn scope_by(mut self, header: HeaderName) -> Self {
        let mut scope = self.config.scope.to_vec();
        if !scope.contains(&header) {
            scope.push(header);
        }
        self.config.scope = scope.into();
        self
    }

    /// Lets the calls of the gRPC method `path` (`/package.Service/Method`, or
    /// `/package.Service/*` for every method of a service; matched against the path's
    /// last two segments, as [`BufferBodyLayer::stream_through`] is) pass through as if
    /// they had no key: never remembered, never answered from the store.
    ///
    /// Name every server-streaming and bidirectional method whose callers may send a
    /// key: a remembered answer is read to its end first, so a server stream would
    /// reach its client only once it ended, and a bidirectional call whose client waits
    /// for an answer before it sends the next message would hang until its deadline.
    /// (Server-sent events, `text/event-stream`, are recognised and always streamed.)
    ///
    /// # Errors
    /// A pattern that would match every call or none (`*`, a `*` before the end, no
    /// method, no service, more than two segments) is a [`ConfigError`].
    ///
    /// [`BufferBodyLayer::stream_through`]: crate::http::body::BufferBodyLayer::stream_through
    pub fn stream_through(mut self, path: impl Into<String>) -> Result<Self, ConfigError> {
        let path = path.into();
        crate::http::check_method_pattern("idempotency.stream_through", &path)?;
        self.config.stream_through.push(path);
        Ok(self)
    }

    /// Refuses a request whose method is not safe (anything but `GET`, `HEAD`,
    /// `OPTIONS` and `TRACE`) and that carries no usable key (none, blank, or not
    /// visible ASCII): `400 Bad Request` with a problem document, as the IETF draft
    /// "The Idempotency-Key HTTP Header Field" says for an operation that requires the
    /// header; `INVALID_ARGUMENT` for a gRPC call. A method named with
    /// [`stream_through`](Self::stream_through) is exempt. Off by default: a request
    /// without a key then runs as if the layer were not there.
    pub fn require_key(mut self) -> Self {
        self.config.require_key = true;
        self
    }

    /// Reads the key from `header` instead of `idempotency-key`.
    pub fn header(mut self, header: HeaderName) -> Self {
        self.config.header = header;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<St> {
        &self.store
    }
}

impl<St> Clone for IdempotencyLayer<St> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

impl<St: fmt::Debug> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}

impl<S, St> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(inner, self.store.clone(), Arc::new(self.config.clone()))
    }
}
