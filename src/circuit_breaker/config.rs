//! The builder, the serde configuration, and their validation.

use super::layer::CircuitBreakerLayer;
use super::state::{Breaker, MAX_PROBES, OnTransition, Rate, Settings, Trip};
use super::window::{CountWindow, MAX_BUCKETS, TimeWindow, Window};
use crate::classify::ErrorClassifier;
use crate::error::ConfigError;
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::time::Instant;

/// Builds a [`CircuitBreakerLayer`], validating the configuration.
///
/// Defaults (resilience4j's where they are sensible for a service-to-service call):
///
/// | setting | default |
/// |---|---|
/// | window | count window of the last 100 calls |
/// | `failure_rate_threshold` | 0.5 (trips at ≥ 50 % failures) |
/// | `minimum_calls` | 20 (capped at the size of a count window) |
/// | slow calls | not tracked |
/// | `break_duration` | 5 s, fixed (no growth, no jitter) |
/// | `permitted_probes` | 3 |
/// | `max_wait_in_half_open` | 60 s |
/// | a call whose future is dropped unfinished | not counted ([`count_dropped`](Self::count_dropped)) |
pub struct CircuitBreakerBuilder {
    name: Cow<'static, str>,
    failure_rate: f64,
    window: WindowKind,
    minimum_calls: u32,
    consecutive_failures: Option<u32>,
    slow_call_duration: Option<Duration>,
    slow_call_rate: f64,
    break_duration: Duration,
    max_break_duration: Option<Duration>,
    break_multiplier: f64,
    jitter: f64,
    seed: Option<u64>,
    permitted_probes: u32,
    max_wait_in_half_open: Option<Duration>,
    count_calls: bool,
    count_dropped: bool,
    hook: Option<Box<dyn OnTransition>>,
}

#[derive(Debug, Clone, Copy)]
enum WindowKind {
    Count(u32),
    Time(Duration, u32),
}

impl fmt::Debug for CircuitBreakerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerBuilder")
            .field("name", &self.name)
            .field("failure_rate", &self.failure_rate)
            .field("window", &self.window)
            .field("minimum_calls", &self.minimum_calls)
            .field("consecutive_failures", &self.consecutive_failures)
            .field("slow_call_duration", &self.slow_call_duration)
            .field("slow_call_rate", &self.slow_call_rate)
            .field("break_duration", &self.break_duration)
            .field("max_break_duration", &self.max_break_duration)
            .field("break_multiplier", &self.break_multiplier)
            .field("jitter", &self.jitter)
            .field("permitted_probes", &self.permitted_probes)
            .field("max_wait_in_half_open", &self.max_wait_in_half_open)
            .field("count_calls", &self.count_calls)
            .field("count_dropped", &self.count_dropped)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl Default for CircuitBreakerBuilder {
    fn default() -> Self {
        Self {
            name: Cow::Borrowed(""),
            failure_rate: 0.5,
            window: WindowKind::Count(100),
            minimum_calls: 20,
            consecutive_failures: None,
            slow_call_duration: None,
            slow_call_rate: 1.0,
            break_duration: Duration::from_secs(5),
            max_break_duration: None,
            break_multiplier: 1.0,
            jitter: 0.0,
            seed: None,
            permitted_probes: 3,
            max_wait_in_half_open: Some(DEFAULT_MAX_WAIT_IN_HALF_OPEN),
            count_calls: false,
            count_dropped: false,
            hook: None,
        }
    }
}

/// The default of [`CircuitBreakerBuilder::max_wait_in_half_open`].
const DEFAULT_MAX_WAIT_IN_HALF_OPEN: Duration = Duration::from_secs(60);

/// The largest count window (its ring keeps one byte per call).
const MAX_COUNT_WINDOW: u32 = 1 << 20;

fn err(field: &'static str, message: impl Into<Cow<'static, str>>) -> ConfigError {
    ConfigError::new(field, message)
}

fn positive(field: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(err(field, "must be greater than zero"));
    }
    Ok(())
}

fn rate(field: &'static str, r: f64) -> Result<(), ConfigError> {
    // `!(r > 0.0)` also rejects NaN.
    if !(r > 0.0 && r <= 1.0) {
        return Err(err(field, format!("must be in (0, 1], got {r}")));
    }
    Ok(())
}

// === impl CircuitBreakerBuilder ===

impl CircuitBreakerBuilder {
    /// A name for logs, metrics labels and [`Transition`](super::Transition)s
    /// (default empty). Give each breaker its own: breakers of one name share their
    /// metrics series, so the `postbox_circuit_state` gauge of two unnamed breakers
    /// shows whichever changed last (a per-key breaker is named `NAME/KEY`, or `KEY`).
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Trips when at least this fraction of the calls in the window failed, in
    /// `(0, 1]`. Also decides half-open: it re-opens when at least this fraction of the
    /// probes failed. Failures and overloads count; ignored outcomes do not. Rates are
    /// taken to the nearest millionth and compared exactly (55 failures of 100 calls
    /// reach 0.55).
    pub fn failure_rate_threshold(mut self, rate: f64) -> Self {
        self.failure_rate = rate;
        self
    }

    /// Evaluates the last `size` calls (a true sliding window: after `size` successes,
    /// `size / 2` failures reach a 50 % rate).
    pub fn count_window(mut self, size: u32) -> Self {
        self.window = WindowKind::Count(size);
        self
    }

    /// Evaluates the calls of the last `duration`, kept in `buckets` buckets: a call
    /// leaves the window once its bucket is `duration` old (so after between
    /// `duration − duration/buckets` and `duration`).
    pub fn time_window(mut self, duration: Duration, buckets: u32) -> Self {
        self.window = WindowKind::Time(duration, buckets);
        self
    }

    /// Rates are evaluated only once the window holds this many calls (≥ 1).
    ///
    /// For a count window it is capped at the window's size (as resilience4j does):
    /// otherwise a breaker with `minimum_calls > size` could never trip.
    pub fn minimum_calls(mut self, n: u32) -> Self {
        self.minimum_calls = n;
        self
    }

    /// The simple mode: trips after `n` failures in a row (≥ 1); any success resets
    /// the count. Replaces the window; slow-call tracking cannot be combined with it
    /// ([`build`](Self::build) rejects [`slow_calls`](Self::slow_calls) here).
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = Some(n);
        self
    }

    /// Tracks slow calls: a call taking strictly longer than `duration` is slow, and
    /// the breaker trips when at least `rate` of the window is slow (resilience4j's
    /// default rate is 1.0). Costs two clock reads per call. Rate mode only: with
    /// [`consecutive_failures`](Self::consecutive_failures), `build` returns a
    /// [`ConfigError`].
    pub fn slow_calls(mut self, duration: Duration, rate: f64) -> Self {
        self.slow_call_duration = Some(duration);
        self.slow_call_rate = rate;
        self
    }

    /// How long the breaker stays open before probing (default 5 s).
    pub fn break_duration(mut self, d: Duration) -> Self {
        self.break_duration = d;
        self
    }

    /// Grows the break with consecutive openings (openings without a close in
    /// between): `break_duration × multiplier^(openings − 1)`, capped at `max`.
    pub fn break_backoff(mut self, multiplier: f64, max: Duration) -> Self {
        self.break_multiplier = multiplier;
        self.max_break_duration = Some(max);
        self
    }

    /// Shortens each break by a random fraction of up to `jitter` (in `[0, 1)`), so a
    /// fleet of clients does not probe in lockstep; a break is never longer than
    /// configured.
    pub fn break_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Seeds the jitter's random numbers (tests and simulations). Each key of a keyed
    /// breaker draws from its own sequence, derived from the seed and the key.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// At most this many probe calls run at once in half-open (1 to 255); a probe
    /// dropped before its outcome, or whose outcome is ignored, gives its place to
    /// another. The breaker closes or reopens once min(`minimum_calls`, `n`) probes
    /// have an outcome, on their failure (and slow-call) rate, as resilience4j does;
    /// in consecutive-failures mode, once `n` have.
    pub fn permitted_probes(mut self, n: u32) -> Self {
        self.permitted_probes = n;
        self
    }

    /// Re-opens a half-open breaker whose probes have not all come back `d` after the
    /// newest was admitted, so it does not stay stuck half-open (default 60 s; like
    /// resilience4j's `maxWaitDurationInHalfOpenState`, off by default there, which
    /// counts from entering half-open: here a probe let in late still gets all of `d`
    /// to answer). A probe that
    /// never answers (no timeout inside the breaker), or a probe slot reserved by a
    /// `poll_ready` whose `call` never comes (a balancer keeping an unchosen service
    /// ready), would otherwise keep every other call rejected. A probe dropped unanswered
    /// (a timeout outside the breaker) gives its slot back and is not counted (unless
    /// [`count_dropped`](Self::count_dropped)): the next probe restarts the wait, so
    /// probes that keep hanging keep the breaker half-open, letting in
    /// `permitted_probes` at a time; set `count_dropped` to have them reopen it.
    /// `Duration::MAX` switches it off.
    pub fn max_wait_in_half_open(mut self, d: Duration) -> Self {
        self.max_wait_in_half_open = Some(d);
        self
    }

    /// Counts every call that completes through the breaker, by its class, in
    /// `postbox_calls_total{layer="circuit_breaker", outcome}` (`success`, `failure`,
    /// `ignored`; `rejected` is always counted): also a call admitted before a state
    /// change, whose outcome the breaker's new window does not take; not a call made
    /// while the breaker is disabled (it is not classified then). Off
    /// by default. With no recorder installed the counter costs a few nanoseconds at
    /// most (`benches/telemetry.rs` measures no difference per call); with one, what
    /// the recorder costs.
    pub fn count_calls(mut self, on: bool) -> Self {
        self.count_calls = on;
        self
    }

    /// Counts a call whose response future is dropped before it completes (its caller
    /// gave up: a timeout outside the breaker, a client that went away) as a failure.
    /// Off by default, as in resilience4j and Polly: a dropped call then records
    /// nothing, and a dropped probe gives its slot back. Turn it on when the breaker
    /// sits inside a timeout that is the only sign of a hung dependency; leave it off
    /// when callers cancel for reasons of their own (a hedge, a race), which would
    /// otherwise trip the breaker on a healthy dependency.
    pub fn count_dropped(mut self, on: bool) -> Self {
        self.count_dropped = on;
        self
    }

    /// Calls `hook` on every state transition.
    pub fn on_transition(mut self, hook: impl OnTransition) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }

    /// Validates and builds the layer.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field: a threshold outside `(0, 1]`, a window size,
    /// bucket count, minimum number of calls or probe count of zero (or too large), a
    /// zero duration, a backoff multiplier below 1, a cap below the break, a jitter
    /// outside `[0, 1)`, or slow calls with `consecutive_failures`.
    pub fn build(self) -> Result<CircuitBreakerLayer<ErrorClassifier>, ConfigError> {
        let breaker = self.build_breaker(Instant::now())?;
        Ok(CircuitBreakerLayer::from_breaker(Arc::new(breaker)))
    }

    pub(crate) fn take_hook(&mut self) -> Option<Box<dyn OnTransition>> {
        self.hook.take()
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        rate("circuit_breaker.failure_rate_threshold", self.failure_rate)?;
        match self.window {
            WindowKind::Count(0) => {
                return Err(err("circuit_breaker.window.size", "must be at least 1"));
            }
            WindowKind::Count(n) if n > MAX_COUNT_WINDOW => {
                return Err(err(
                    "circuit_breaker.window.size",
                    format!("must be at most {MAX_COUNT_WINDOW} (one byte per call is kept)"),
                ));
            }
            WindowKind::Count(_) => {}
            WindowKind::Time(d, buckets) => {
                positive("circuit_breaker.window.duration", d)?;
                if buckets == 0 || buckets >= MAX_BUCKETS {
                    return Err(err(
                        "circuit_breaker.window.buckets",
                        format!("must be in 1..{MAX_BUCKETS}"),
                    ));
                }
                // The window's position is packed in 48 bits of bucket numbers: 1 ns
                // buckets would wrap after 78 hours of uptime, 1 µs ones after 8 years.
                if (d.as_nanos() / u128::from(buckets)) < 1_000 {
                    return Err(err(
                        "circuit_breaker.window.buckets",
                        "buckets must be at least 1 µs wide (duration / buckets)",
                    ));
                }
            }
        }
        if self.minimum_calls == 0 {
            return Err(err("circuit_breaker.minimum_calls", "must be at least 1"));
        }
        if self.consecutive_failures == Some(0) {
            return Err(err(
                "circuit_breaker.consecutive_failures",
                "must be at least 1",
            ));
        }
        if let Some(d) = self.slow_call_duration {
            if self.consecutive_failures.is_some() {
                // Silently ignored before: a user counting on slow calls to trip the
                // breaker would find out during the outage.
                return Err(err(
                    "circuit_breaker.slow_call_duration",
                    "has no effect with consecutive_failures (slow calls are judged by a \
                     window's rate): remove one of the two",
                ));
            }
            positive("circuit_breaker.slow_call_duration", d)?;
        }
        rate(
            "circuit_breaker.slow_call_rate_threshold",
            self.slow_call_rate,
        )?;
        if self.slow_call_duration.is_none() && self.slow_call_rate != 1.0 {
            // Silently ignored before: no call is slow without a duration.
            return Err(err(
                "circuit_breaker.slow_call_rate_threshold",
                "has no effect without slow_call_duration (what counts as slow): set both, \
                 or neither",
            ));
        }
        positive("circuit_breaker.break_duration", self.break_duration)?;
        if !(self.break_multiplier >= 1.0 && self.break_multiplier.is_finite()) {
            return Err(err(
                "circuit_breaker.break_multiplier",
                "must be a finite number ≥ 1",
            ));
        }
        if self.break_multiplier > 1.0
            && self
                .max_break_duration
                .is_none_or(|m| m == self.break_duration)
        {
            // Without a cap, or with a cap at `break_duration`, the break is capped at
            // `break_duration`: it never grows.
            return Err(err(
                "circuit_breaker.max_break_duration",
                "must be set above break_duration when break_multiplier is above 1 (the \
                 longest a growing break may last)",
            ));
        }
        if self.break_multiplier == 1.0
            && self
                .max_break_duration
                .is_some_and(|m| m != self.break_duration)
        {
            // Silently ignored before: a break that does not grow never reaches a cap.
            return Err(err(
                "circuit_breaker.max_break_duration",
                "has no effect without a break_multiplier above 1 (the break does not \
                 grow): set both, or neither",
            ));
        }
        if self
            .max_break_duration
            .is_some_and(|m| m < self.break_duration)
        {
            return Err(err(
                "circuit_breaker.max_break_duration",
                "must be at least break_duration",
            ));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(err("circuit_breaker.break_jitter", "must be in [0, 1)"));
        }
        if self.permitted_probes == 0 || self.permitted_probes > MAX_PROBES {
            return Err(err(
                "circuit_breaker.permitted_probes",
                format!("must be in 1..={MAX_PROBES}"),
            ));
        }
        if let Some(d) = self.max_wait_in_half_open {
            positive("circuit_breaker.max_wait_in_half_open", d)?;
        }
        Ok(())
    }

    /// Validates and builds the bare breaker, its time starting at `origin`.
    pub(crate) fn build_breaker(mut self, origin: Instant) -> Result<Breaker, ConfigError> {
        self.validate()?;
        let hook = self.hook.take().unwrap_or_else(|| Box::new(()));
        Ok(Breaker::new(self.settings(), origin, hook))
    }

    /// The settings, for a breaker whose hook is supplied elsewhere. Call only after
    /// [`validate`](Self::validate).
    pub(crate) fn settings(&self) -> Settings {
        let trip = match self.consecutive_failures {
            Some(n) => Trip::Consecutive {
                n: u64::from(n),
                count: AtomicU64::new(0),
            },
            None => {
                let (window, minimum_calls) = match self.window {
                    WindowKind::Count(size) => (
                        Window::Count(CountWindow::new(size)),
                        self.minimum_calls.min(size),
                    ),
                    WindowKind::Time(d, buckets) => {
                        let width =
                            u64::try_from(d.as_nanos() / u128::from(buckets)).unwrap_or(u64::MAX);
                        (
                            Window::Time(TimeWindow::new(buckets, width)),
                            self.minimum_calls,
                        )
                    }
                };
                Trip::Rate {
                    window,
                    minimum_calls: u64::from(minimum_calls),
                    slow_call_rate: self
                        .slow_call_duration
                        .map(|_| Rate::new(self.slow_call_rate)),
                }
            }
        };
        let slow_call_duration = match trip {
            Trip::Rate { .. } => self.slow_call_duration,
            Trip::Consecutive { .. } => None,
        };
        Settings {
            name: self.name.clone(),
            trip,
            failure_rate: Rate::new(self.failure_rate),
            slow_call_duration,
            break_duration: self.break_duration,
            max_break_duration: self.max_break_duration.unwrap_or(self.break_duration),
            break_multiplier: self.break_multiplier,
            jitter: self.jitter,
            seed: self.seed,
            permitted_probes: self.permitted_probes,
            max_wait_in_half_open: self.max_wait_in_half_open,
            count_calls: self.count_calls,
            count_dropped: self.count_dropped,
        }
    }
}

// === CircuitBreakerConfig ===

/// A serde-deserializable circuit breaker configuration (TOML, YAML, JSON …).
///
/// Durations are strings with a unit: `"250ms"`, `"2s"`, `"1m"`, `"1h"`, `"500us"`,
/// `"1.5s"`. Unknown fields are an error. Every field is optional; missing ones take
/// the [builder's defaults](CircuitBreakerBuilder).
///
/// # Example
/// ```
/// use postbox::circuit_breaker::CircuitBreakerConfig;
///
/// let config: CircuitBreakerConfig = serde_json::from_str(r#"{
///     "name": "payments",
///     "failure_rate_threshold": 0.25,
///     "window": { "type": "time", "duration": "30s", "buckets": 10 },
///     "minimum_calls": 10,
///     "break_duration": "2s",
///     "max_break_duration": "1m",
///     "break_multiplier": 2.0
/// }"#).unwrap();
/// let layer = config.build().unwrap();
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct CircuitBreakerConfig {
    /// Name for logs and metrics.
    pub name: Option<String>,
    /// See [`CircuitBreakerBuilder::failure_rate_threshold`].
    pub failure_rate_threshold: f64,
    /// The window.
    pub window: WindowConfig,
    /// See [`CircuitBreakerBuilder::minimum_calls`].
    pub minimum_calls: u32,
    /// When set, the consecutive-failures mode ([`CircuitBreakerBuilder::consecutive_failures`]).
    pub consecutive_failures: Option<u32>,
    /// When set, slow-call tracking ([`CircuitBreakerBuilder::slow_calls`]); an error
    /// together with `consecutive_failures`.
    #[serde(deserialize_with = "crate::duration::option")]
    pub slow_call_duration: Option<Duration>,
    /// The slow-call rate that trips (default 1.0).
    pub slow_call_rate_threshold: f64,
    /// See [`CircuitBreakerBuilder::break_duration`].
    #[serde(deserialize_with = "crate::duration::required")]
    pub break_duration: Duration,
    /// The cap of a growing break ([`CircuitBreakerBuilder::break_backoff`]); required
    /// with a `break_multiplier` above 1.
    #[serde(deserialize_with = "crate::duration::option")]
    pub max_break_duration: Option<Duration>,
    /// The growth of the break per consecutive opening (1.0: fixed).
    pub break_multiplier: f64,
    /// See [`CircuitBreakerBuilder::break_jitter`].
    pub break_jitter: f64,
    /// See [`CircuitBreakerBuilder::permitted_probes`].
    pub permitted_probes: u32,
    /// See [`CircuitBreakerBuilder::max_wait_in_half_open`]; `"off"` (`None`) switches
    /// it off.
    #[serde(deserialize_with = "crate::duration::or_off")]
    pub max_wait_in_half_open: Option<Duration>,
    /// See [`CircuitBreakerBuilder::count_calls`].
    pub count_calls: bool,
    /// See [`CircuitBreakerBuilder::count_dropped`].
    pub count_dropped: bool,
}

/// The window of a [`CircuitBreakerConfig`]: `{ "type": "count", "size": 100 }` or
/// `{ "type": "time", "duration": "30s", "buckets": 10 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum WindowConfig {
    /// The last `size` calls.
    Count {
        /// Calls in the window.
        size: u32,
    },
    /// The calls of the last `duration`, in `buckets` buckets.
    Time {
        /// The window's length.
        #[serde(deserialize_with = "crate::duration::required")]
        duration: Duration,
        /// The number of buckets.
        buckets: u32,
    },
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        let b = CircuitBreakerBuilder::default();
        Self {
            name: None,
            failure_rate_threshold: b.failure_rate,
            window: WindowConfig::Count { size: 100 },
            minimum_calls: b.minimum_calls,
            consecutive_failures: None,
            slow_call_duration: None,
            slow_call_rate_threshold: b.slow_call_rate,
            break_duration: b.break_duration,
            max_break_duration: None,
            break_multiplier: b.break_multiplier,
            break_jitter: b.jitter,
            permitted_probes: b.permitted_probes,
            max_wait_in_half_open: b.max_wait_in_half_open,
            count_calls: false,
            count_dropped: false,
        }
    }
}

impl CircuitBreakerConfig {
    /// The equivalent builder (to add a hook, or change a field in code).
    pub fn builder(&self) -> CircuitBreakerBuilder {
        let mut b = CircuitBreakerBuilder {
            failure_rate: self.failure_rate_threshold,
            window: match self.window {
                WindowConfig::Count { size } => WindowKind::Count(size),
                WindowConfig::Time { duration, buckets } => WindowKind::Time(duration, buckets),
            },
            minimum_calls: self.minimum_calls,
            consecutive_failures: self.consecutive_failures,
            slow_call_duration: self.slow_call_duration,
            slow_call_rate: self.slow_call_rate_threshold,
            break_duration: self.break_duration,
            max_break_duration: self.max_break_duration,
            break_multiplier: self.break_multiplier,
            jitter: self.break_jitter,
            permitted_probes: self.permitted_probes,
            max_wait_in_half_open: self.max_wait_in_half_open,
            count_calls: self.count_calls,
            count_dropped: self.count_dropped,
            ..CircuitBreakerBuilder::default()
        };
        if let Some(name) = &self.name {
            b = b.name(name.clone());
        }
        b
    }

    /// Validates and builds the layer.
    ///
    /// # Errors
    /// As [`CircuitBreakerBuilder::build`]; also a `window` or `minimum_calls` set
    /// (to other than its default) with `consecutive_failures`, where it has no effect.
    pub fn build(&self) -> Result<CircuitBreakerLayer<ErrorClassifier>, ConfigError> {
        self.check_mode()?;
        self.builder().build()
    }

    /// With `consecutive_failures` the breaker trips on failures in a row and keeps no
    /// window: a `window` or `minimum_calls` set to other than its default (which the
    /// file cannot tell from not set) would be ignored, and is an error, as slow calls
    /// are.
    pub(crate) fn check_mode(&self) -> Result<(), ConfigError> {
        if self.consecutive_failures.is_none() {
            return Ok(());
        }
        let default = Self::default();
        for (field, set) in [
            ("circuit_breaker.window", self.window != default.window),
            (
                "circuit_breaker.minimum_calls",
                self.minimum_calls != default.minimum_calls,
            ),
        ] {
            if set {
                return Err(ConfigError::new(
                    field,
                    "has no effect with consecutive_failures (the breaker trips on failures \
                     in a row, and keeps no window): remove one of the two",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(b: CircuitBreakerBuilder) -> String {
        b.validate().unwrap_err().field().to_owned()
    }

    /// A window or a minimum of calls beside `consecutive_failures` is an error: the
    /// breaker keeps no window in that mode, and the file's settings did nothing.
    #[test]
    fn a_window_beside_consecutive_failures_is_an_error() {
        for (extra, field) in [
            (
                r#""window": {"type": "time", "duration": "30s", "buckets": 10}"#,
                "circuit_breaker.window",
            ),
            (r#""minimum_calls": 50"#, "circuit_breaker.minimum_calls"),
        ] {
            let config: CircuitBreakerConfig = serde_json::from_str(&format!(
                r#"{{"consecutive_failures": 3, "break_duration": "5s", {extra}}}"#
            ))
            .unwrap();
            assert_eq!(config.build().unwrap_err().field(), field);
        }
        let alone: CircuitBreakerConfig =
            serde_json::from_str(r#"{"consecutive_failures": 3, "break_duration": "5s"}"#).unwrap();
        assert!(alone.build().is_ok());
    }

    /// A growing break needs its cap: without one it was capped at `break_duration`,
    /// so a config file's `break_multiplier` alone silently did nothing.
    /// The reverse: a cap with no growth to cap did nothing.
    #[test]
    fn a_break_cap_without_a_multiplier_is_an_error() {
        let config: CircuitBreakerConfig =
            serde_json::from_str(r#"{"break_duration": "2s", "max_break_duration": "1m"}"#)
                .unwrap();
        let err = config.build().unwrap_err();
        assert_eq!(err.field(), "circuit_breaker.max_break_duration");
        let config: CircuitBreakerConfig =
            serde_json::from_str(r#"{"break_duration": "2s", "max_break_duration": "2s"}"#)
                .unwrap();
        assert!(config.build().is_ok());
    }

    #[test]
    fn a_break_multiplier_without_a_cap_is_an_error() {
        let config: CircuitBreakerConfig =
            serde_json::from_str(r#"{"break_duration": "2s", "break_multiplier": 2.0}"#).unwrap();
        let err = config.build().unwrap_err();
        assert_eq!(err.field(), "circuit_breaker.max_break_duration");
        let config: CircuitBreakerConfig = serde_json::from_str(
            r#"{"break_duration": "2s", "break_multiplier": 2.0, "max_break_duration": "1m"}"#,
        )
        .unwrap();
        assert!(config.build().is_ok());
    }

    /// A slow-call rate with no duration to judge slowness by did nothing, in range or
    /// not (the range was only checked with a duration).
    #[test]
    fn a_slow_call_rate_without_a_duration_is_an_error() {
        for rate in ["0.3", "5.0"] {
            let json = format!(r#"{{"slow_call_rate_threshold": {rate}}}"#);
            let config: CircuitBreakerConfig = serde_json::from_str(&json).unwrap();
            let err = config.build().unwrap_err();
            assert_eq!(err.field(), "circuit_breaker.slow_call_rate_threshold");
        }
        let config: CircuitBreakerConfig = serde_json::from_str(
            r#"{"slow_call_rate_threshold": 0.3, "slow_call_duration": "2s"}"#,
        )
        .unwrap();
        assert!(config.build().is_ok());
    }

    #[test]
    fn invalid_settings_are_errors_not_panics() {
        let b = CircuitBreakerBuilder::default;
        assert_eq!(
            field(b().failure_rate_threshold(0.0)),
            "circuit_breaker.failure_rate_threshold"
        );
        assert_eq!(
            field(b().failure_rate_threshold(1.5)),
            "circuit_breaker.failure_rate_threshold"
        );
        assert_eq!(
            field(b().failure_rate_threshold(f64::NAN)),
            "circuit_breaker.failure_rate_threshold"
        );
        assert_eq!(field(b().count_window(0)), "circuit_breaker.window.size");
        assert_eq!(
            field(b().count_window(u32::MAX)),
            "circuit_breaker.window.size"
        );
        assert_eq!(
            field(b().time_window(Duration::ZERO, 10)),
            "circuit_breaker.window.duration"
        );
        assert_eq!(
            field(b().time_window(Duration::from_secs(1), 0)),
            "circuit_breaker.window.buckets"
        );
        // 999 ns buckets: the window's bucket numbers would wrap within days.
        assert_eq!(
            field(b().time_window(Duration::from_nanos(9_990), 10)),
            "circuit_breaker.window.buckets"
        );
        assert!(
            b().time_window(Duration::from_micros(10), 10)
                .validate()
                .is_ok()
        );
        assert_eq!(field(b().minimum_calls(0)), "circuit_breaker.minimum_calls");
        assert_eq!(
            field(b().consecutive_failures(0)),
            "circuit_breaker.consecutive_failures"
        );
        assert_eq!(
            field(b().break_duration(Duration::ZERO)),
            "circuit_breaker.break_duration"
        );
        assert_eq!(
            field(b().slow_calls(Duration::ZERO, 1.0)),
            "circuit_breaker.slow_call_duration"
        );
        assert_eq!(
            field(b().slow_calls(Duration::from_secs(1), 0.0)),
            "circuit_breaker.slow_call_rate_threshold"
        );
        assert_eq!(
            field(
                b().consecutive_failures(3)
                    .slow_calls(Duration::from_secs(1), 0.5)
            ),
            "circuit_breaker.slow_call_duration",
            "slow calls would be ignored in consecutive-failures mode"
        );
        assert_eq!(
            field(b().break_backoff(0.5, Duration::from_secs(60))),
            "circuit_breaker.break_multiplier"
        );
        assert_eq!(
            field(b().break_backoff(2.0, Duration::from_secs(1))),
            "circuit_breaker.max_break_duration"
        );
        assert_eq!(
            field(b().break_backoff(2.0, Duration::from_secs(5))),
            "circuit_breaker.max_break_duration",
            "a growing break capped at break_duration (5 s) never grows"
        );
        assert_eq!(field(b().break_jitter(1.0)), "circuit_breaker.break_jitter");
        assert_eq!(
            field(b().permitted_probes(0)),
            "circuit_breaker.permitted_probes"
        );
        assert_eq!(
            field(b().permitted_probes(256)),
            "circuit_breaker.permitted_probes"
        );
        assert_eq!(
            field(b().max_wait_in_half_open(Duration::ZERO)),
            "circuit_breaker.max_wait_in_half_open"
        );
        assert!(
            b().failure_rate_threshold(1.0)
                .count_window(1)
                .minimum_calls(1)
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn config_rejects_unknown_fields() {
        let e =
            serde_json::from_str::<CircuitBreakerConfig>(r#"{"failure_rate": 0.5}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = serde_json::from_str::<CircuitBreakerConfig>(
            r#"{"window": {"type": "count", "size": 3, "x": 1}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn config_durations_and_defaults() {
        let c: CircuitBreakerConfig =
            serde_json::from_str(r#"{"break_duration": "250ms", "max_wait_in_half_open": "1m"}"#)
                .unwrap();
        assert_eq!(c.break_duration, Duration::from_millis(250));
        assert_eq!(c.max_wait_in_half_open, Some(Duration::from_secs(60)));
        assert_eq!(c.window, WindowConfig::Count { size: 100 });
        assert!(c.build().is_ok());
        let bad: CircuitBreakerConfig = serde_json::from_str(r#"{"permitted_probes": 0}"#).unwrap();
        assert!(bad.build().is_err());
    }
}
