//! Circuit breaker errors.

use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// The circuit is open (or half-open with every probe slot taken): the call was
/// rejected without reaching the inner service.
///
/// Our own rejection: breakers never count it. It carries how long until the breaker
/// admits a probe again, which the retry layer honours and the HTTP mapping sends as
/// `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    next: Next,
}

/// When the next probe is allowed: a fixed wait, or an instant (the breaker's own
/// rejections, so rejecting needs no clock read; the wait is computed when asked).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Next {
    After(Duration),
    At(Instant),
}

impl Open {
    /// A rejection whose next probe is allowed after `retry_after`.
    pub const fn new(retry_after: Duration) -> Self {
        Self {
            next: Next::After(retry_after),
        }
    }

    /// A rejection whose next probe is allowed at `at`.
    pub const fn at(at: Instant) -> Self {
        Self { next: Next::At(at) }
    }

    /// How long until the breaker admits a probe (zero: half-open, probes busy).
    ///
    /// For the breaker's own rejections this is measured from now (tokio's clock), so
    /// it counts down while the error is kept.
    pub fn retry_after(&self) -> Duration {
        match self.next {
            Next::After(d) => d,
            Next::At(at) => at.saturating_duration_since(Instant::now()),
        }
    }
}

impl fmt::Display for Open {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "circuit open; next probe in {:?}", self.retry_after())
    }
}

impl std::error::Error for Open {}
