//! What counts as success, failure, overload — the one classifier every layer asks.
//!
//! Every postbox layer asks a [`Classify`] implementation "did it work?" instead of
//! using an ad-hoc predicate, so a breaker, a retry and the enqueue fallback always
//! agree. An outcome (`Result<&Response, &Error>`) is classified once into a
//! [`Classification`]: a [`Class`] (success / failure / overload / ignored) plus
//! whether it is *retryable*, whether the effect *may have taken effect*, and an
//! optional server *retry hint*.
//!
//! | outcome | class |
//! |---|---|
//! | HTTP 5xx; transport and connect errors; our own attempt timeout | failure (retryable) |
//! | HTTP 429, 503 with `Retry-After`; gRPC `RESOURCE_EXHAUSTED` | overload (retryable after the hint) |
//! | HTTP 408 | failure that may have taken effect (a handler timeout's, as likely as the RFC's) |
//! | HTTP 409 with `Retry-After` (the idempotency layer's "request in progress"), and its gRPC form: `UNAVAILABLE` with [`postbox-in-progress`](grpc::IN_PROGRESS_HEADER) | ignored, retryable after the hint |
//! | any other HTTP 4xx but 408/429 | success for the breaker, not retryable |
//! | gRPC `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`, `UNKNOWN`, `DATA_LOSS` | failure |
//! | other gRPC codes (`INVALID_ARGUMENT`, `NOT_FOUND`, …) | success for the breaker |
//! | missing `grpc-status` | failure (`UNKNOWN`; grpc-go reports `INTERNAL`, tonic 0.14 reads a `200` without one as success) |
//! | our own rejections (circuit open, bulkhead full) | ignored: never counted by a breaker |
//!
//! # Example
//! ```
//! use postbox::classify::{Class, Classify, ErrorClassifier};
//! use postbox::BoxError;
//!
//! let classifier = ErrorClassifier::new();
//! let ok: Result<&u32, &BoxError> = Ok(&7);
//! assert_eq!(classifier.classify(ok).class(), Class::Success);
//!
//! let refused: BoxError = std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
//! let c = classifier.classify(Err::<&u32, _>(&refused));
//! assert_eq!(c.class(), Class::Failure);
//! assert!(c.is_retryable());
//! assert!(!c.may_have_taken_effect()); // the request never left
//! ```

mod error;
#[cfg(feature = "http")]
pub mod grpc;
#[cfg(feature = "http")]
pub mod http;

#[cfg(feature = "grpc")]
pub(crate) use self::error::NotDispatched;
pub use self::error::{AsError, classify_error};
#[cfg(feature = "http")]
pub use self::grpc::GrpcClassifier;
#[cfg(feature = "http")]
pub use self::http::HttpClassifier;

use std::time::Duration;

/// The class of an outcome.
///
/// * `Success` — it worked, or failed for a reason that says nothing about the
///   dependency's health (a 404, an `INVALID_ARGUMENT`).
/// * `Failure` — the dependency failed (5xx, transport error, timeout).
/// * `Overload` — the dependency asked us to slow down (429, 503 with `Retry-After`,
///   `RESOURCE_EXHAUSTED`); counts against a breaker like a failure.
/// * `Ignored` — not recorded at all (our own rejections, a cancelled call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Class {
    /// It worked, or failed in a way that says nothing about the dependency's health.
    Success,
    /// The dependency failed.
    Failure,
    /// The dependency is overloaded and asked us to back off.
    Overload,
    /// Not recorded by anyone (our own rejections).
    Ignored,
}

/// The answer to "did it work?" for one outcome.
///
/// Built with [`Classification::success`], [`failure`](Classification::failure),
/// [`overload`](Classification::overload) or [`ignored`](Classification::ignored) and
/// refined with the `with_*` methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    class: Class,
    retryable: bool,
    may_have_taken_effect: bool,
    retry_after: Option<Duration>,
    own_rejection: bool,
}

// === impl Classification ===

impl Classification {
    /// A success: not retryable, may have taken effect.
    pub const fn success() -> Self {
        Self {
            class: Class::Success,
            retryable: false,
            may_have_taken_effect: true,
            retry_after: None,
            own_rejection: false,
        }
    }

    /// A failure of the dependency: retryable, may have taken effect.
    pub const fn failure() -> Self {
        Self {
            class: Class::Failure,
            retryable: true,
            may_have_taken_effect: true,
            retry_after: None,
            own_rejection: false,
        }
    }

    /// The dependency is overloaded: retryable after `retry_after` (if the server gave one).
    pub const fn overload(retry_after: Option<Duration>) -> Self {
        Self {
            class: Class::Overload,
            retryable: true,
            may_have_taken_effect: true,
            retry_after,
            own_rejection: false,
        }
    }

    /// Not counted by anyone: not retryable, no effect.
    pub const fn ignored() -> Self {
        Self {
            class: Class::Ignored,
            retryable: false,
            may_have_taken_effect: false,
            retry_after: None,
            own_rejection: false,
        }
    }

    /// Sets whether a retry may help.
    pub const fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Sets whether the request may have reached the dependency and taken effect.
    ///
    /// `false` means it certainly did not (a refused connection, our own rejection), so
    /// even a non-idempotent request can be retried or deferred safely.
    pub const fn with_effect(mut self, may_have_taken_effect: bool) -> Self {
        self.may_have_taken_effect = may_have_taken_effect;
        self
    }

    /// Sets the server's (or our own breaker's) hint of when to try again.
    pub const fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// Marks our own rejection (an open breaker, a full bulkhead): nothing was sent.
    pub(crate) const fn as_own_rejection(mut self) -> Self {
        self.own_rejection = true;
        self
    }

    /// Whether the outcome is a rejection by one of our own layers inside (an open
    /// circuit breaker's [`Open`](crate::circuit_breaker::error::Open), a full bulkhead's
    /// [`Full`](crate::bulkhead::error::Full)), as [`classify_error`] finds it anywhere in
    /// an error's chain: nothing reached the dependency. The retry layer bounds its
    /// wait for an open breaker by its own `max_open_wait` and charges no budget for
    /// the retry after one. A classifier's own [`ignored`](Self::ignored) outcome is
    /// not one.
    pub const fn is_own_rejection(&self) -> bool {
        self.own_rejection
    }

    /// The class.
    pub const fn class(&self) -> Class {
        self.class
    }

    /// Whether a retry (or a later replay) may succeed.
    pub const fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// Whether the request may have reached the dependency and taken effect.
    pub const fn may_have_taken_effect(&self) -> bool {
        self.may_have_taken_effect
    }

    /// The earliest a retry should be made, if a hint was given.
    pub const fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// `true` for [`Class::Success`].
    pub const fn is_success(&self) -> bool {
        matches!(self.class, Class::Success)
    }

    /// `true` for [`Class::Failure`] and [`Class::Overload`]: counts against a breaker.
    pub const fn is_failure(&self) -> bool {
        matches!(self.class, Class::Failure | Class::Overload)
    }

    /// `true` for [`Class::Ignored`]: recorded by no one.
    pub const fn is_ignored(&self) -> bool {
        matches!(self.class, Class::Ignored)
    }
}

/// Classifies the outcome of a call.
///
/// Implemented by [`ErrorClassifier`] (any response is a success, errors by kind),
/// [`HttpClassifier`] and [`GrpcClassifier`] (with the `http` feature), and by any
/// closure `Fn(Result<&Res, &E>) -> Classification`.
pub trait Classify<Res, E> {
    /// Classifies one outcome.
    fn classify(&self, outcome: Result<&Res, &E>) -> Classification;
}

impl<F, Res, E> Classify<Res, E> for F
where
    F: Fn(Result<&Res, &E>) -> Classification,
{
    fn classify(&self, outcome: Result<&Res, &E>) -> Classification {
        self(outcome)
    }
}

/// Classifies every response as a success and errors by kind (see [`classify_error`]).
///
/// The default for services whose responses carry no status (anything that is not
/// HTTP or gRPC).
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorClassifier {
    _priv: (),
}

impl ErrorClassifier {
    /// Creates the classifier.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<Res, E: AsError> Classify<Res, E> for ErrorClassifier {
    fn classify(&self, outcome: Result<&Res, &E>) -> Classification {
        match outcome {
            Ok(_) => Classification::success(),
            Err(e) => match e.as_error() {
                Some(e) => classify_error(e),
                None => Classification::failure(),
            },
        }
    }
}
