use super::policy::DeferPolicy;
use super::service::{Defer, Shared};
use crate::classify::ErrorClassifier;
use crate::error::ConfigError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tower_layer::Layer;

/// Settings shared by both flavours: which requests may be deferred, how much body is
/// buffered, and how long a stored message lives.
///
/// Defaults: [`DeferPolicy::new`] (reads stay synchronous), a 64 KiB body limit, a
/// 24 hour time to live, and a dependency's `Retry-After` honoured up to an hour.
#[derive(Debug, Clone)]
pub struct EnqueueConfig {
    pub(crate) policy: DeferPolicy,
    pub(crate) max_body: usize,
    pub(crate) ttl: Option<Duration>,
    pub(crate) max_retry_after: Duration,
}

// === impl EnqueueConfig ===

impl EnqueueConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self {
            policy: DeferPolicy::new(),
            max_body: 64 * 1024,
            ttl: Some(Duration::from_secs(24 * 60 * 60)),
            max_retry_after: super::DEFAULT_MAX_RETRY_AFTER,
        }
    }

    /// Which requests stay synchronous.
    pub fn policy(mut self, policy: DeferPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Request bodies up to `bytes` are buffered (and so may be deferred); larger ones
    /// stream through and are never deferred: a failure of one that would have been is
    /// returned as it is, counted as `not_deferred` and logged at `warn`. `0` defers
    /// only empty bodies.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// A stored message expires (is dead-lettered instead of replayed) `ttl` after the
    /// request was made.
    ///
    /// Keep it below the receiving service's idempotency ttl, with a margin for the
    /// replay itself (the [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer)'s
    /// is 25 hours by default, against this 24): a replay after the receiver forgot the
    /// key runs the request again, and an effect whose first attempt went through
    /// happens twice.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// A request deferred after the dependency answered with a hint (`Retry-After`,
    /// `grpc-retry-pushback-ms`) is stored not before `min(hint, max)` from now (default
    /// [`DEFAULT_MAX_RETRY_AFTER`](super::DEFAULT_MAX_RETRY_AFTER), an hour; the
    /// replayer's [`max_retry_after`](super::Replayer::max_retry_after) caps the later
    /// waits): a bogus or far-off hint does not park the message. Only the capped wait
    /// is compared with the message's expiry. An open breaker's own `retry_after` is
    /// not capped.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Stored messages never expire. A replay that comes after the receiving service
    /// forgot the request's idempotency key (see [`ttl`](Self::ttl)) may make its
    /// effect twice.
    pub fn no_expiry(mut self) -> Self {
        self.ttl = None;
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// A zero `ttl` is a [`ConfigError`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::new("enqueue.ttl", "must be greater than zero"));
        }
        Ok(())
    }
}

impl Default for EnqueueConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Applies the HTTP flavour, [`EnqueueFallback`](super::EnqueueFallback): a deferred
/// request is answered `202 Accepted`.
#[cfg(feature = "http")]
pub struct EnqueueFallbackLayer<Q, C = crate::classify::HttpClassifier> {
    queue: Arc<Q>,
    classifier: C,
    config: EnqueueConfig,
}

#[cfg(feature = "http")]
impl<Q> EnqueueFallbackLayer<Q> {
    /// Defers into `queue` with the default [`EnqueueConfig`] and
    /// [`HttpClassifier`](crate::classify::HttpClassifier).
    pub fn new(queue: Arc<Q>) -> Self {
        Self {
            queue,
            classifier: crate::classify::HttpClassifier::new(),
            config: EnqueueConfig::new(),
        }
    }

    /// Defers into `queue` with `config`.
    ///
    /// # Errors
    /// An invalid `config` (see [`EnqueueConfig::validate`]).
    pub fn with_config(queue: Arc<Q>, config: EnqueueConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            queue,
            classifier: crate::classify::HttpClassifier::new(),
            config,
        })
    }
}

#[cfg(feature = "http")]
impl<Q, C> EnqueueFallbackLayer<Q, C> {
    /// Decides "retryable failure" with `classifier` (use the same one as the retry
    /// layer inside).
    pub fn with_classifier<C2>(self, classifier: C2) -> EnqueueFallbackLayer<Q, C2> {
        EnqueueFallbackLayer {
            queue: self.queue,
            classifier,
            config: self.config,
        }
    }

    /// The queue.
    pub fn queue(&self) -> &Arc<Q> {
        &self.queue
    }
}

#[cfg(feature = "http")]
impl<Q, C: Clone> Clone for EnqueueFallbackLayer<Q, C> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
            classifier: self.classifier.clone(),
            config: self.config.clone(),
        }
    }
}

#[cfg(feature = "http")]
impl<Q, C: fmt::Debug> fmt::Debug for EnqueueFallbackLayer<Q, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnqueueFallbackLayer")
            .field("classifier", &self.classifier)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "http")]
impl<S, Q, C: Clone> Layer<S> for EnqueueFallbackLayer<Q, C> {
    type Service = super::EnqueueFallback<S, Q, C>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = Shared::new(
            self.queue.clone(),
            self.classifier.clone(),
            self.config.clone(),
        );
        super::EnqueueFallback::new(inner, Arc::new(shared))
    }
}

/// Applies the typed flavour, [`Defer`]: any `Service<Req>` with a
/// [`RequestCodec<Req>`](super::RequestCodec); a deferred call yields
/// [`Deferred::Enqueued`](super::Deferred::Enqueued).
pub struct DeferLayer<Q, K, C = ErrorClassifier> {
    queue: Arc<Q>,
    codec: Arc<K>,
    classifier: C,
    config: EnqueueConfig,
}

// === impl DeferLayer ===

impl<Q, K> DeferLayer<Q, K> {
    /// Defers into `queue`, capturing requests with `codec`, with the default
    /// [`EnqueueConfig`] and [`ErrorClassifier`].
    pub fn new(queue: Arc<Q>, codec: K) -> Self {
        Self {
            queue,
            codec: Arc::new(codec),
            classifier: ErrorClassifier::new(),
            config: EnqueueConfig::new(),
        }
    }

    /// Defers into `queue` with `config`.
    ///
    /// # Errors
    /// An invalid `config` (see [`EnqueueConfig::validate`]).
    pub fn with_config(
        queue: Arc<Q>,
        codec: K,
        config: EnqueueConfig,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            ..Self::new(queue, codec)
        })
    }
}

impl<Q, K, C> DeferLayer<Q, K, C> {
    /// Decides "retryable failure" with `classifier`.
    pub fn with_classifier<C2>(self, classifier: C2) -> DeferLayer<Q, K, C2> {
        DeferLayer {
            queue: self.queue,
            codec: self.codec,
            classifier,
            config: self.config,
        }
    }
}

impl<Q, K, C: Clone> Clone for DeferLayer<Q, K, C> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
            codec: self.codec.clone(),
            classifier: self.classifier.clone(),
            config: self.config.clone(),
        }
    }
}

impl<Q, K, C: fmt::Debug> fmt::Debug for DeferLayer<Q, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferLayer")
            .field("classifier", &self.classifier)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S, Q, K, C: Clone> Layer<S> for DeferLayer<Q, K, C> {
    type Service = Defer<S, Q, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = Shared::new(
            self.queue.clone(),
            self.classifier.clone(),
            self.config.clone(),
        );
        Defer::new(inner, Arc::new(shared), self.codec.clone())
    }
}
