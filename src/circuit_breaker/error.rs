//! Circuit breaker errors.

use std::fmt;
use std::time::Duration;

/// The circuit is open (or half-open with every probe slot taken): the call was
/// rejected without reaching the inner service.
///
/// Our own rejection: breakers never count it. It carries how long until the breaker
/// admits a probe again, which the retry layer honours and the HTTP mapping sends as
/// `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    retry_after: Duration,
}

impl Open {
    /// A rejection whose next probe is allowed after `retry_after`.
    pub const fn new(retry_after: Duration) -> Self {
        Self { retry_after }
    }

    /// How long until the breaker admits a probe (zero: half-open, probes busy).
    pub const fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for Open {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "circuit open; next probe in {:?}", self.retry_after)
    }
}

impl std::error::Error for Open {}
