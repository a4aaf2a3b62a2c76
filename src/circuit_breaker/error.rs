//! Circuit breaker errors.

use crate::BoxError;
use crate::classify::AsError;
use std::fmt;
use std::time::Duration;

/// The circuit is open (or half-open with every probe slot taken): the call was
/// rejected without reaching the inner service.
///
/// Our own rejection: breakers never count it. It carries how long until the breaker
/// admits a probe again, which the retry layer honours and the HTTP mapping sends as
/// `Retry-After`.
///
/// A breaker [forced open](super::CircuitBreakerHandle::force_open) has no such time:
/// its rejection [`is_forced`](Self::is_forced), and its `retry_after` is only the
/// break duration, a pause before asking again (the enqueue fallback's deferral, the
/// replayer's hold-back, the mappings' hint). The retry layer does not wait for it:
/// the call ends with the rejection at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// In nanoseconds (saturated): a rejection converts nothing until it is asked.
    retry_after_ns: u64,
    forced: bool,
}

impl Open {
    /// A rejection whose next probe is allowed after `retry_after` (at most
    /// `u64::MAX` nanoseconds, about 584 years).
    pub const fn new(retry_after: Duration) -> Self {
        let ns = retry_after.as_nanos();
        Self::from_nanos(if ns > u64::MAX as u128 {
            u64::MAX
        } else {
            ns as u64
        })
    }

    #[inline]
    pub(crate) const fn from_nanos(retry_after_ns: u64) -> Self {
        Self {
            retry_after_ns,
            forced: false,
        }
    }

    /// The rejection of a breaker forced open, asked again after `pause`.
    #[inline]
    pub(crate) const fn forced_from_nanos(pause_ns: u64) -> Self {
        Self {
            retry_after_ns: pause_ns,
            forced: true,
        }
    }

    /// Whether the breaker was forced open by hand: it admits nothing until it is
    /// changed by hand again, so waiting `retry_after` is no promise of a probe.
    pub const fn is_forced(&self) -> bool {
        self.forced
    }

    #[inline]
    pub(crate) const fn as_nanos(&self) -> u64 {
        self.retry_after_ns
    }

    /// How long until the breaker admits a probe (zero: half-open, probes busy).
    pub const fn retry_after(&self) -> Duration {
        Duration::from_nanos(self.retry_after_ns)
    }
}

impl fmt::Display for Open {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.forced {
            f.write_str("circuit forced open")
        } else {
            write!(f, "circuit open; next probe in {:?}", self.retry_after())
        }
    }
}

impl std::error::Error for Open {}

/// The error of a [`CircuitBreaker`](super::CircuitBreaker) or
/// [`KeyedCircuitBreaker`](super::KeyedCircuitBreaker): the breaker's own rejection, or
/// the inner service's error.
///
/// It is not boxed, so a rejection costs no allocation. It converts into
/// [`BoxError`] with `?` or `.into()` — a rejection becomes a boxed
/// [`Open`] (so `downcast_ref::<Open>()` and [`is_caused_by`](crate::error::is_caused_by)
/// find it), an inner error is boxed as it would be — so it composes with every tower
/// layer that boxes errors. Classifiers see through it ([`AsError`]).
///
/// It does not implement `std::error::Error` itself (that would make the conversion to
/// `BoxError` ambiguous); convert it to `BoxError` for error reporters.
#[derive(Debug)]
pub enum Error<E> {
    /// The breaker rejected the call: the inner service was not called.
    Open(Open),
    /// The inner service failed.
    Inner(E),
}

impl<E> Error<E> {
    /// The rejection, if the breaker rejected the call.
    pub fn open(&self) -> Option<&Open> {
        match self {
            Error::Open(open) => Some(open),
            Error::Inner(_) => None,
        }
    }

    /// The inner service's error, if it failed.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Error::Open(_) => None,
            Error::Inner(e) => Some(e),
        }
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Open(open) => open.fmt(f),
            Error::Inner(e) => e.fmt(f),
        }
    }
}

impl<E: Into<BoxError>> From<Error<E>> for BoxError {
    fn from(e: Error<E>) -> Self {
        match e {
            Error::Open(open) => Box::new(open),
            Error::Inner(e) => e.into(),
        }
    }
}

impl<E: AsError> AsError for Error<E> {
    fn as_error(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Open(open) => Some(open),
            Error::Inner(e) => e.as_error(),
        }
    }
}
