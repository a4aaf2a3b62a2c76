//! Timeout errors.

use std::fmt;
use std::time::Duration;

/// An attempt ran longer than the [`AttemptTimeout`](super::AttemptTimeout) allows;
/// the inner future was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elapsed {
    after: Duration,
}

impl Elapsed {
    /// An attempt timeout that fired after `after`.
    pub const fn new(after: Duration) -> Self {
        Self { after }
    }

    /// The configured timeout.
    pub const fn after(&self) -> Duration {
        self.after
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "attempt timed out after {:?}", self.after)
    }
}

impl std::error::Error for Elapsed {}

/// The call's [`Deadline`](super::Deadline) passed, either before the call (the inner
/// service was never called) or while it ran (the inner future was dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadlineExceeded {
    budget: Duration,
    before_call: bool,
}

impl DeadlineExceeded {
    /// A deadline with `budget` that passed; `before_call` if the inner service was
    /// never called.
    pub const fn new(budget: Duration, before_call: bool) -> Self {
        Self {
            budget,
            before_call,
        }
    }

    /// The budget the call had when it entered the layer (zero if it was already spent).
    pub const fn budget(&self) -> Duration {
        self.budget
    }

    /// `true` if the deadline had passed before the inner service was called: the
    /// request certainly had no effect.
    pub const fn expired_before_call(&self) -> bool {
        self.before_call
    }
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.before_call {
            f.write_str("deadline already exceeded; the request was not sent")
        } else {
            write!(f, "deadline of {:?} exceeded", self.budget)
        }
    }
}

impl std::error::Error for DeadlineExceeded {}

/// The call's deadline passed while its response body was still being read: a frame
/// was pending at the deadline (`BodyDeadline`, with `http`). The head had
/// been answered; the body ends with this error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BodyDeadlineExceeded {}

impl BodyDeadlineExceeded {
    /// The error.
    pub const fn new() -> Self {
        Self {}
    }
}

impl fmt::Display for BodyDeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline exceeded while reading the response body")
    }
}

impl std::error::Error for BodyDeadlineExceeded {}
