use super::service::{AttemptTimeout, Deadline, NoPropagation};
use crate::error::ConfigError;
use std::time::Duration;
use tower_layer::Layer;

/// Applies an [`AttemptTimeout`] to a service.
///
/// `P` decides whether the attempt's end travels with the request: [`NoPropagation`]
/// (any request type) or [`HttpPropagation`](super::HttpPropagation).
#[derive(Debug, Clone, Copy)]
pub struct AttemptTimeoutLayer<P = NoPropagation> {
    timeout: Duration,
    propagate: P,
}

// === impl AttemptTimeoutLayer ===

impl AttemptTimeoutLayer {
    /// A timeout of `timeout` per attempt.
    ///
    /// # Errors
    /// A zero timeout is a [`ConfigError`].
    pub fn new(timeout: Duration) -> Result<Self, ConfigError> {
        Self::with_propagation(timeout, NoPropagation)
    }
}

#[cfg(feature = "http")]
impl AttemptTimeoutLayer<super::HttpPropagation> {
    /// A timeout of `timeout` per attempt of an HTTP or gRPC request, which tells the
    /// next hop when the attempt ends: `grpc-timeout` /
    /// [`TIMEOUT_MS_HEADER`](super::TIMEOUT_MS_HEADER) and the
    /// [`CallDeadline`](super::CallDeadline) extension are set to the sooner of the
    /// attempt's end and the call's deadline (the `CallDeadline` a
    /// [`DeadlineLayer::http`] outside set, or a retry layer anchored from a timeout
    /// header the caller set). The attempt ends at that sooner time too: at its own end
    /// with [`Elapsed`](super::error::Elapsed), at the call's deadline with
    /// [`DeadlineExceeded`](super::error::DeadlineExceeded). A shorter timeout header
    /// the caller set that no retry layer anchored is told to the next hop as it is,
    /// but does not shorten this layer's timer (see [`HttpPropagation`](super::HttpPropagation)).
    ///
    /// # Errors
    /// A zero timeout is a [`ConfigError`].
    pub fn http(timeout: Duration) -> Result<Self, ConfigError> {
        Self::with_propagation(timeout, super::HttpPropagation::new())
    }
}

impl<P> AttemptTimeoutLayer<P> {
    /// A timeout of `timeout` per attempt, told to the next hop as `propagate` says.
    ///
    /// # Errors
    /// A zero timeout is a [`ConfigError`].
    pub fn with_propagation(timeout: Duration, propagate: P) -> Result<Self, ConfigError> {
        if timeout.is_zero() {
            return Err(ConfigError::new(
                "attempt_timeout",
                "must be greater than zero",
            ));
        }
        Ok(Self { timeout, propagate })
    }

    /// The configured timeout.
    pub const fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl<S, P: Clone> Layer<S> for AttemptTimeoutLayer<P> {
    type Service = AttemptTimeout<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        AttemptTimeout::new(inner, self.timeout, self.propagate.clone())
    }
}

/// Applies a [`Deadline`] to a service.
///
/// `P` decides how the deadline travels with the request: [`NoPropagation`] (any
/// request type) or [`HttpPropagation`](super::HttpPropagation) (extension and headers).
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer<P = NoPropagation> {
    budget: Duration,
    propagate: P,
}

// === impl DeadlineLayer ===

impl DeadlineLayer {
    /// A deadline of `budget` for everything inside, not propagated.
    ///
    /// # Errors
    /// A zero budget is a [`ConfigError`].
    pub fn new(budget: Duration) -> Result<Self, ConfigError> {
        Self::with_propagation(budget, NoPropagation)
    }
}

#[cfg(feature = "http")]
impl DeadlineLayer<super::HttpPropagation> {
    /// A deadline of `budget` for HTTP and gRPC requests, propagated in the
    /// [`CallDeadline`](super::CallDeadline) extension and the `grpc-timeout` /
    /// [`TIMEOUT_MS_HEADER`](super::TIMEOUT_MS_HEADER) headers.
    ///
    /// This is the client side: a shorter timeout header already on the request counts
    /// as the caller's own limit. On a server, use
    /// [`with_propagation`](Self::with_propagation) with
    /// [`HttpPropagation::new().with_inbound_headers()`](super::HttpPropagation::with_inbound_headers)
    /// (honour the previous hop's deadline) or
    /// [`ignoring_inbound_headers()`](super::HttpPropagation::ignoring_inbound_headers)
    /// (do not trust it), as [`ServerConfig`](crate::config::ServerConfig) does.
    ///
    /// # Errors
    /// A zero budget is a [`ConfigError`].
    pub fn http(budget: Duration) -> Result<Self, ConfigError> {
        Self::with_propagation(budget, super::HttpPropagation::new())
    }
}

impl<P> DeadlineLayer<P> {
    /// A deadline of `budget` that travels with the request as `propagate` says.
    ///
    /// # Errors
    /// A zero budget is a [`ConfigError`].
    pub fn with_propagation(budget: Duration, propagate: P) -> Result<Self, ConfigError> {
        if budget.is_zero() {
            return Err(ConfigError::new("deadline", "must be greater than zero"));
        }
        Ok(Self { budget, propagate })
    }

    /// The configured budget.
    pub const fn budget(&self) -> Duration {
        self.budget
    }
}

impl<S, P: Clone> Layer<S> for DeadlineLayer<P> {
    type Service = Deadline<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline::new(inner, self.budget, self.propagate.clone())
    }
}
