use super::keyed::{KeyedBulkheadLayer, Keys};
use super::service::{Bulkhead, Shared};
use crate::error::ConfigError;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;
use tower_layer::Layer;

/// The largest `max_concurrent` a bulkhead accepts.
const MAX_CONCURRENT: usize = usize::MAX >> 3;

/// Applies a [`Bulkhead`]; every service it makes shares one set of permits.
#[derive(Debug, Clone)]
pub struct BulkheadLayer {
    shared: Arc<Shared>,
}

/// Builds a [`BulkheadLayer`], validating the configuration.
#[derive(Debug, Clone)]
pub struct BulkheadBuilder {
    max_concurrent: usize,
    max_waiting: usize,
    max_wait: Option<Duration>,
}

// === impl BulkheadLayer ===

impl BulkheadLayer {
    /// A fail-fast bulkhead of `max_concurrent` permits and no waiting.
    ///
    /// # Errors
    /// `max_concurrent` of zero is a [`ConfigError`].
    pub fn new(max_concurrent: usize) -> Result<Self, ConfigError> {
        Self::builder().max_concurrent(max_concurrent).build()
    }

    /// A builder, starting from 100 permits, fail fast.
    pub fn builder() -> BulkheadBuilder {
        BulkheadBuilder {
            max_concurrent: 100,
            max_waiting: 0,
            max_wait: None,
        }
    }

    /// Permits not currently reserved or in flight.
    pub fn available_permits(&self) -> usize {
        self.shared.available_permits()
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bulkhead::new(inner, self.shared.clone())
    }
}

// === impl BulkheadBuilder ===

impl BulkheadBuilder {
    /// At most this many calls in flight (at least 1).
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n;
        self
    }

    /// At most this many callers waiting for a permit; 0 (the default) fails fast.
    pub fn max_waiting(mut self, n: usize) -> Self {
        self.max_waiting = n;
        self
    }

    /// How long a waiting caller waits before it is rejected.
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = Some(d);
        self
    }

    /// Backpressure: any number of callers wait, for as long as it takes
    /// (`poll_ready` stays `Pending`), like tower's `ConcurrencyLimit`.
    pub fn backpressure(mut self) -> Self {
        self.max_waiting = usize::MAX;
        self.max_wait = None;
        self
    }

    /// Validates and builds the layer.
    ///
    /// # Errors
    /// `max_concurrent` of 0 or above `usize::MAX >> 3`, or waiting allowed
    /// (`max_waiting` > 0) with a zero `max_wait` or none: a wait without a bound is
    /// [`backpressure`](Self::backpressure), which says so.
    pub fn build(self) -> Result<BulkheadLayer, ConfigError> {
        self.validate()?;
        Ok(BulkheadLayer {
            shared: Arc::new(Shared::new(
                self.max_concurrent,
                self.max_waiting,
                self.max_wait,
            )),
        })
    }

    /// Validates and builds a layer of one bulkhead per key, each with these limits:
    /// `key_fn` picks a request's key (any `Fn(&Req) -> K`). Calls for one key never
    /// take the permits of another, so a dependency that answers slowly fills its own
    /// bulkhead, not the others'. See [`KeyedBulkhead`](super::KeyedBulkhead).
    ///
    /// # Errors
    /// As [`build`](Self::build), and [`backpressure`](Self::backpressure): a keyed
    /// bulkhead's `poll_ready` cannot know the key, so it cannot hold callers back;
    /// every call would wait in its future, without bound. Use a bounded wait.
    pub fn keyed<K: Hash + Eq, F>(
        self,
        key_fn: F,
    ) -> Result<KeyedBulkheadLayer<K, F>, ConfigError> {
        self.validate()?;
        if self.max_waiting == usize::MAX && self.max_wait.is_none() {
            return Err(ConfigError::new(
                "bulkhead.max_waiting",
                "a bulkhead per key cannot apply backpressure (its poll_ready does not know \
                 the key): set a max_wait",
            ));
        }
        let keys = Keys::new(self.max_concurrent, self.max_waiting, self.max_wait);
        Ok(KeyedBulkheadLayer::new(keys, key_fn))
    }

    /// [`keyed`](Self::keyed) by the request's authority ([`ByAuthority`](crate::circuit_breaker::ByAuthority)):
    /// one bulkhead per host and port, as the config client stack has.
    ///
    /// # Errors
    /// As [`keyed`](Self::keyed).
    #[cfg(feature = "http")]
    pub fn keyed_by_authority(
        self,
    ) -> Result<
        KeyedBulkheadLayer<http::uri::Authority, crate::circuit_breaker::ByAuthority>,
        ConfigError,
    > {
        self.keyed(crate::circuit_breaker::ByAuthority)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent == 0 {
            return Err(ConfigError::new(
                "bulkhead.max_concurrent",
                "must be at least 1",
            ));
        }
        if self.max_concurrent > MAX_CONCURRENT {
            return Err(ConfigError::new(
                "bulkhead.max_concurrent",
                format!("must be at most {MAX_CONCURRENT}"),
            ));
        }
        if self.max_waiting > 0 && self.max_waiting != usize::MAX && self.max_wait.is_none() {
            return Err(ConfigError::new(
                "bulkhead.max_wait",
                "must be set when max_waiting > 0 (a wait with no bound is backpressure(); \
                 use max_waiting = 0 to fail fast)",
            ));
        }
        if self.max_waiting > 0 && self.max_wait.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new(
                "bulkhead.max_wait",
                "must be greater than zero when max_waiting > 0 (use max_waiting = 0 to fail fast)",
            ));
        }
        Ok(())
    }
}
