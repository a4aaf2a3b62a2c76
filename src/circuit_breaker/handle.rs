use super::state::{Breaker, Metrics, Now, State};
use std::sync::Arc;
use std::time::Duration;

/// Observes and controls one breaker; cheap to clone (one `Arc`).
///
/// Get it from [`CircuitBreakerLayer::handle`](super::CircuitBreakerLayer::handle),
/// [`CircuitBreaker::handle`](super::CircuitBreaker::handle) or, per key,
/// [`KeyedCircuitBreakerHandle::get`](super::KeyedCircuitBreakerHandle::get). Every
/// manual change is a transition like any other: it bumps the generation, fires the
/// hook, and drops the late results of calls admitted before it (all but one that
/// completes in the instant of the change, having checked its generation before the
/// change and recorded after it: that one outcome may land in the new state's count).
#[derive(Debug, Clone)]
pub struct CircuitBreakerHandle {
    breaker: Arc<Breaker>,
}

// === impl CircuitBreakerHandle ===

impl CircuitBreakerHandle {
    pub(crate) fn new(breaker: Arc<Breaker>) -> Self {
        Self { breaker }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        self.breaker.name()
    }

    /// The current state.
    ///
    /// An open breaker moves to half-open when a call comes after its break, not when
    /// the break ends: an idle breaker reads `Open` (and its `postbox_circuit_state`
    /// gauge 1) until the next call, even long after the break. [`retry_after`](Self::retry_after)
    /// says `Some(0)` then: the next call will be a probe.
    pub fn state(&self) -> State {
        self.breaker.state()
    }

    /// A snapshot of the state, the window's counts and rates, and the calls rejected.
    pub fn metrics(&self) -> Metrics {
        self.breaker.metrics(&mut Now::lazy())
    }

    /// While open, how long until the break ends; `None` in any other state.
    pub fn retry_after(&self) -> Option<Duration> {
        self.breaker.retry_after(&mut Now::lazy())
    }

    /// Rejects every call until another manual change ([`State::ForcedOpen`]). Its
    /// rejections are [forced](super::error::Open::is_forced): the retry layer returns
    /// them at once instead of waiting, and they carry the configured base break
    /// duration as `retry_after`, a pause before asking again (there is no scheduled
    /// end to report).
    pub fn force_open(&self) {
        self.breaker
            .force(State::ForcedOpen, false, &mut Now::lazy());
    }

    /// Closes the breaker now with an empty window; it trips again as usual. (To keep
    /// it closed whatever happens, use [`disable`](Self::disable) or
    /// [`metrics_only`](Self::metrics_only).)
    pub fn force_closed(&self) {
        self.breaker.force(State::Closed, false, &mut Now::lazy());
    }

    /// Lets every call through and records nothing ([`State::Disabled`]).
    pub fn disable(&self) {
        self.breaker.force(State::Disabled, false, &mut Now::lazy());
    }

    /// Lets every call through and records it, never tripping ([`State::MetricsOnly`]).
    pub fn metrics_only(&self) {
        self.breaker
            .force(State::MetricsOnly, false, &mut Now::lazy());
    }

    /// Back to a new breaker: closed, empty window, the break back to its base, the
    /// rejected-call count at zero.
    pub fn reset(&self) {
        self.breaker.force(State::Closed, true, &mut Now::lazy());
    }
}
