//! Enqueue errors.

use crate::BoxError;
use crate::queue::{DeferReason, QueueError};
use std::fmt;

/// A request that should have been deferred could not be stored: the queue failed or
/// was full. No receipt was given and nothing may have been stored.
///
/// Carries both failures:
/// * [`source()`](std::error::Error::source) is the **original failure** (the call's
///   error, or a [`FailedResponse`] if the dependency answered with a retryable
///   failure), so [`find_cause`](crate::error::find_cause) still finds an
///   [`Open`](crate::circuit_breaker::error::Open) and the HTTP/gRPC mappings still
///   apply;
/// * [`queue_error()`](Self::queue_error) is the queue's error, also in the `Display`
///   text.
#[derive(Debug)]
pub struct NotEnqueued {
    reason: DeferReason,
    original: BoxError,
    queue: QueueError,
    key: String,
}

impl NotEnqueued {
    pub(crate) fn new(reason: DeferReason, original: BoxError, queue: QueueError) -> Self {
        Self {
            reason,
            original,
            queue,
            key: String::new(),
        }
    }

    pub(crate) fn with_key(mut self, key: String) -> Self {
        self.key = key;
        self
    }

    /// The idempotency key the call's attempts carried (the caller's own, or one the
    /// layer generated for it). The failed attempts may have taken effect: a caller
    /// that tries the request again should send it with this key, so that the receiver
    /// runs it at most once. `None` if the request had none.
    pub fn idempotency_key(&self) -> Option<&str> {
        Some(self.key.as_str()).filter(|k| !k.is_empty())
    }

    /// Why the request was to be deferred.
    pub fn reason(&self) -> DeferReason {
        self.reason
    }

    /// The original failure of the call.
    pub fn original(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.original
    }

    /// The queue's error.
    pub fn queue_error(&self) -> &QueueError {
        &self.queue
    }

    /// Both errors: `(original, queue)`.
    pub fn into_parts(self) -> (BoxError, QueueError) {
        (self.original, self.queue)
    }
}

impl fmt::Display for NotEnqueued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request not enqueued ({}): {}; original failure: {}",
            super::receipt::reason_str(self.reason),
            self.queue,
            self.original
        )
    }
}

impl std::error::Error for NotEnqueued {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.original)
    }
}

/// The dependency answered with a retryable failure (e.g. `503`) that was to be
/// deferred: the original failure inside a [`NotEnqueued`] when the call returned a
/// response rather than an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedResponse {
    description: String,
    retry_after: Option<std::time::Duration>,
}

impl FailedResponse {
    pub(crate) fn new(description: String, retry_after: Option<std::time::Duration>) -> Self {
        Self {
            description,
            retry_after,
        }
    }

    /// What the dependency answered (for HTTP, the status line).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// When the dependency asked to be called again (its `Retry-After`, or its gRPC
    /// pushback), if it did: the HTTP and gRPC mappings of a [`NotEnqueued`] pass it
    /// on, so a caller told to slow down is not told to retry at once.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }
}

impl fmt::Display for FailedResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dependency answered {}", self.description)
    }
}

impl std::error::Error for FailedResponse {}
