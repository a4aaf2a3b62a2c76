//! Bulkhead errors.

use std::fmt;
use std::time::Duration;

/// The bulkhead had no permit for this call: `max_concurrent` calls were in flight and
/// either `max_waiting` callers were already waiting or this one waited `max_wait`.
///
/// Our own rejection: the request never reached the inner service, and circuit
/// breakers do not count it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full {
    max_concurrent: usize,
    max_waiting: usize,
    waited: Option<Duration>,
}

impl Full {
    /// A rejection by a bulkhead of `max_concurrent` permits and `max_waiting` waiters.
    pub const fn new(max_concurrent: usize, max_waiting: usize) -> Self {
        Self {
            max_concurrent,
            max_waiting,
            waited: None,
        }
    }

    pub(crate) const fn after_waiting(mut self, waited: Duration) -> Self {
        self.waited = Some(waited);
        self
    }

    /// The bulkhead's concurrency limit.
    pub const fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    /// How long this caller waited before being rejected (`None`: rejected at once).
    pub const fn waited(&self) -> Option<Duration> {
        self.waited
    }
}

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.waited {
            Some(w) => write!(
                f,
                "bulkhead full: no permit of {} freed within {w:?}",
                self.max_concurrent
            ),
            None => write!(
                f,
                "bulkhead full: {} calls in flight and {} waiting",
                self.max_concurrent, self.max_waiting
            ),
        }
    }
}

impl std::error::Error for Full {}
