//! Backoff between attempts: constant, linear or exponential, capped, with jitter.
//!
//! Pure code: [`Backoff::delay`] is a function of the retry number, the previous delay
//! and a random number in `[0, 1)`, so it is tested without a clock or an RNG.
//! [`JitterRng`] supplies the random numbers in the layer (thread-local by default,
//! seeded for deterministic tests).

use crate::error::ConfigError;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The longest delay any backoff computes, whatever its factor: one day. Keeps the
/// arithmetic finite; a sensible configuration caps far below it.
pub const MAX_BACKOFF: Duration = Duration::from_secs(24 * 60 * 60);

/// How the delay grows with each retry.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Growth {
    /// The same delay before every retry: `base`.
    Constant,
    /// `base × n` before the `n`th retry.
    Linear,
    /// `base × factor^(n−1)` before the `n`th retry.
    Exponential {
        /// The multiplier per retry (greater than or equal to 1).
        factor: f64,
    },
}

/// How the computed delay is randomised, so that many callers do not retry in step.
///
/// With `d` the (capped) computed delay before a retry:
///
/// | jitter | delay | reference |
/// |---|---|---|
/// | `None` | `d` | |
/// | `Full` | uniform in `[0, d]` | AWS "full jitter", Envoy |
/// | `Equal` | `d/2 +` uniform in `[0, d/2]` | AWS "equal jitter", Finagle |
/// | `Decorrelated` | uniform in `[base, 3 × previous]`, capped (growth ignored) | AWS "decorrelated jitter" |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Jitter {
    /// The exact computed delay.
    None,
    /// Uniform between zero and the computed delay.
    #[default]
    Full,
    /// Half the computed delay plus a uniform share of the other half.
    Equal,
    /// Uniform between the base delay and three times the previous delay.
    Decorrelated,
}

/// A backoff schedule: growth, base delay, cap and jitter.
///
/// Built infallibly; [`validate`](Self::validate) (called by the retry builder) rejects
/// a zero or non-finite factor, a factor below 1, or a cap below the base.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use postbox::retry::backoff::{Backoff, Jitter};
///
/// let backoff = Backoff::exponential(Duration::from_millis(100))
///     .with_factor(2.0)
///     .with_max_delay(Duration::from_secs(1))
///     .with_jitter(Jitter::None);
/// assert!(backoff.validate().is_ok());
/// // Delays before retries 1, 2, 3, 4, 5: 100 ms, 200 ms, 400 ms, 800 ms, then capped.
/// let ms: Vec<u128> = (1..=5)
///     .map(|n| backoff.delay(n, Duration::ZERO, 0.5).as_millis())
///     .collect();
/// assert_eq!(ms, [100, 200, 400, 800, 1000]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    growth: Growth,
    base: Duration,
    max: Duration,
    jitter: Jitter,
}

// === impl Backoff ===

impl Backoff {
    /// `base` before every retry, no jitter.
    pub const fn constant(base: Duration) -> Self {
        Self {
            growth: Growth::Constant,
            base,
            max: MAX_BACKOFF,
            jitter: Jitter::None,
        }
    }

    /// `base × n` before the `n`th retry, full jitter, no cap but [`MAX_BACKOFF`].
    pub const fn linear(base: Duration) -> Self {
        Self {
            growth: Growth::Linear,
            base,
            max: MAX_BACKOFF,
            jitter: Jitter::Full,
        }
    }

    /// `base × 2^(n−1)` before the `n`th retry, full jitter, no cap but
    /// [`MAX_BACKOFF`].
    pub const fn exponential(base: Duration) -> Self {
        Self {
            growth: Growth::Exponential { factor: 2.0 },
            base,
            max: MAX_BACKOFF,
            jitter: Jitter::Full,
        }
    }

    /// Sets the growth factor (makes the backoff exponential).
    pub const fn with_factor(mut self, factor: f64) -> Self {
        self.growth = Growth::Exponential { factor };
        self
    }

    /// Caps every computed delay (before jitter) at `max`.
    pub const fn with_max_delay(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// Sets the jitter.
    pub const fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The growth.
    pub const fn growth(&self) -> Growth {
        self.growth
    }

    /// The delay before the first retry (before jitter).
    pub const fn base(&self) -> Duration {
        self.base
    }

    /// The cap.
    pub const fn max_delay(&self) -> Duration {
        self.max
    }

    /// The jitter.
    pub const fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// Checks the values.
    ///
    /// # Errors
    /// A factor that is not finite or below 1 (zero included), a cap below the base, or
    /// a base or cap above [`MAX_BACKOFF`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Growth::Exponential { factor } = self.growth {
            if !factor.is_finite() {
                return Err(ConfigError::new(
                    "retry.backoff.factor",
                    "must be a finite number",
                ));
            }
            if factor < 1.0 {
                return Err(ConfigError::new(
                    "retry.backoff.factor",
                    "must be at least 1 (a factor below 1 shrinks the delay)",
                ));
            }
        }
        if self.max > MAX_BACKOFF {
            return Err(ConfigError::new(
                "retry.backoff.max_delay",
                "must be at most one day",
            ));
        }
        if self.max < self.base {
            return Err(ConfigError::new(
                "retry.backoff.max_delay",
                "must be greater than or equal to the base delay",
            ));
        }
        Ok(())
    }

    /// Whether [`longest`](Self::longest) is the same before every retry: a constant
    /// schedule, a zero base, a base at the cap, or exponential growth by 1. (A schedule
    /// that grows may give the same delay twice in a row, rounded to the nanosecond.)
    #[cfg(feature = "config")]
    pub(crate) fn is_flat(&self) -> bool {
        if self.base.is_zero() || self.base >= self.max {
            return true;
        }
        match (self.jitter, self.growth) {
            (Jitter::Decorrelated, _) | (_, Growth::Linear) => false,
            (_, Growth::Constant) => true,
            (_, Growth::Exponential { factor }) => factor == 1.0,
        }
    }

    /// The delay before the computed (un-jittered, capped) `retry`th retry (1-based).
    pub fn computed(&self, retry: u32) -> Duration {
        let n = retry.max(1);
        let d = match self.growth {
            Growth::Constant => self.base,
            Growth::Linear => self.base.saturating_mul(n),
            // A zero base is no backoff at any retry (`0 × ∞` would be NaN, read as
            // "past the cap": a sudden `max_delay` sleep after ~1000 retries).
            Growth::Exponential { .. } if self.base.is_zero() => Duration::ZERO,
            Growth::Exponential { factor } => {
                let scale = factor.powi(i32::try_from(n - 1).unwrap_or(i32::MAX));
                let secs = self.base.as_secs_f64() * scale;
                if secs.is_finite() && secs < self.max.as_secs_f64() {
                    Duration::from_secs_f64(secs.max(0.0))
                } else {
                    self.max
                }
            }
        };
        d.min(self.max)
    }

    /// The longest delay [`delay`](Self::delay) can give before the `retry`th retry
    /// (1-based), whatever the random numbers, when each previous delay came from this
    /// schedule: the computed delay, or for decorrelated jitter `base × 3^retry` (each
    /// delay at most three times the last), capped. (A retry layer that waited out a
    /// server's longer `Retry-After` passes that as the previous delay: decorrelated
    /// jitter may then grow from it, up to the cap.)
    pub fn longest(&self, retry: u32) -> Duration {
        match self.jitter {
            Jitter::None | Jitter::Full | Jitter::Equal => self.computed(retry),
            Jitter::Decorrelated => {
                let mut d = self.base.min(self.max);
                // At most ~60 rounds: from 1 ns, ×3 passes a day (the largest cap) by then.
                for _ in 0..retry.max(1) {
                    if d.is_zero() || d == self.max {
                        break;
                    }
                    d = d.saturating_mul(3).min(self.max);
                }
                d
            }
        }
    }

    /// The delay before the `retry`th retry (1-based), given the previous delay (for
    /// decorrelated jitter; zero before the first retry) and `unit`, a random number in
    /// `[0, 1)` (values outside are clamped).
    ///
    /// Never panics, never exceeds the cap.
    pub fn delay(&self, retry: u32, prev: Duration, unit: f64) -> Duration {
        // `unit` reaches the delay only through `scale`, which clamps it.
        match self.jitter {
            Jitter::None => self.computed(retry),
            Jitter::Full => scale(self.computed(retry), unit),
            Jitter::Equal => {
                let d = self.computed(retry);
                let half = d / 2;
                half + scale(d - half, unit)
            }
            Jitter::Decorrelated => {
                let low = self.base.min(self.max);
                let prev = prev.max(low);
                let high = prev.saturating_mul(3).min(self.max);
                low + scale(high.saturating_sub(low), unit)
            }
        }
    }
}

/// `d × unit` for `unit` in `[0, 1]` (a non-finite unit counts as 0, the rest is
/// clamped), never above `d`.
pub(crate) fn scale(d: Duration, unit: f64) -> Duration {
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    // (`d` itself when the product does not fit a `Duration`: `unit` is at most 1.)
    Duration::try_from_secs_f64(d.as_secs_f64() * unit).map_or(d, |s| s.min(d))
}

impl Default for Backoff {
    /// Exponential from 100 ms, factor 2, capped at 10 s, full jitter.
    fn default() -> Self {
        Self::exponential(Duration::from_millis(100)).with_max_delay(Duration::from_secs(10))
    }
}

/// The source of random numbers for jitter.
///
/// Thread-local ([`fastrand`]) by default; [`seeded`](Self::seeded) makes a
/// deterministic sequence shared by every clone (for tests); [`from_fn`](Self::from_fn)
/// takes any source.
#[derive(Clone, Default)]
pub struct JitterRng {
    kind: RngKind,
}

#[derive(Clone, Default)]
enum RngKind {
    #[default]
    Thread,
    Seeded(Arc<AtomicU64>),
    Custom(Arc<dyn Fn() -> f64 + Send + Sync>),
}

// === impl JitterRng ===

impl JitterRng {
    /// Thread-local randomness (the default); no allocation, no shared state.
    pub const fn thread() -> Self {
        Self {
            kind: RngKind::Thread,
        }
    }

    /// A deterministic sequence from `seed`, shared by every clone (a lock-free
    /// splitmix64 counter), so tests can predict the delays.
    pub fn seeded(seed: u64) -> Self {
        Self {
            kind: RngKind::Seeded(Arc::new(AtomicU64::new(seed))),
        }
    }

    /// Numbers from `f`, which should return values in `[0, 1)` (others are clamped).
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn() -> f64 + Send + Sync + 'static,
    {
        Self {
            kind: RngKind::Custom(Arc::new(f)),
        }
    }

    /// The next number in `[0, 1)`.
    pub fn next_unit(&self) -> f64 {
        match &self.kind {
            RngKind::Thread => fastrand::f64(),
            RngKind::Seeded(state) => {
                const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
                let mut z = state
                    .fetch_add(GAMMA, Ordering::Relaxed)
                    .wrapping_add(GAMMA);
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                // 53 random bits → [0, 1)
                (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
            }
            // A custom source may answer anything: NaN counts as 0, the rest is
            // clamped into `[0, 1)`.
            RngKind::Custom(f) => match f() {
                u if u.is_nan() => 0.0,
                u => u.clamp(0.0, 1.0 - f64::EPSILON / 2.0),
            },
        }
    }
}

impl fmt::Debug for JitterRng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            RngKind::Thread => "thread",
            RngKind::Seeded(_) => "seeded",
            RngKind::Custom(_) => "custom",
        };
        f.debug_tuple("JitterRng").field(&kind).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_delays_with_full_jitter_do_not_panic() {
        let b = Backoff::constant(Duration::MAX)
            .with_max_delay(Duration::MAX)
            .with_jitter(Jitter::Full);
        for unit in [0.0, 0.5, 1.0] {
            let d = b.delay(1, Duration::ZERO, unit);
            assert!(d <= b.max_delay(), "{d:?} past the cap at {unit}");
        }
        assert_eq!(b.delay(1, Duration::ZERO, 1.0), Duration::MAX);
        assert_eq!(b.delay(1, Duration::ZERO, 0.0), Duration::ZERO);
    }

    /// `scale` takes a unit outside `[0, 1]` as its nearest bound and a non-finite one
    /// as 0 (as `delay` always did): a broken jitter source never widens a spread to its
    /// whole range.
    #[test]
    fn scale_clamps_a_unit_outside_zero_to_one() {
        let d = Duration::from_secs(10);
        assert_eq!(scale(d, f64::NAN), Duration::ZERO);
        assert_eq!(scale(d, -1.0), Duration::ZERO);
        assert_eq!(scale(d, f64::NEG_INFINITY), Duration::ZERO);
        assert_eq!(scale(d, f64::INFINITY), Duration::ZERO);
        assert_eq!(scale(d, 2.0), d);
        assert_eq!(scale(d, 0.25), Duration::from_millis(2500));
    }

    #[test]
    fn a_custom_jitter_source_is_kept_within_zero_to_one() {
        for (answer, want) in [(f64::NAN, 0.0), (-3.0, 0.0), (0.5, 0.5)] {
            assert_eq!(JitterRng::from_fn(move || answer).next_unit(), want);
        }
        let high = JitterRng::from_fn(|| 7.0).next_unit();
        assert!((0.0..1.0).contains(&high), "{high}");
    }

    /// A zero base means no backoff at every retry, also the ten-thousandth
    /// exponential one (`0 × ∞` made it the one-day cap).
    #[test]
    fn a_zero_base_never_backs_off() {
        let b = Backoff::exponential(Duration::ZERO).with_jitter(Jitter::None);
        for retry in [1, 2, 1_000, 1_100, 10_000, u32::MAX] {
            assert_eq!(
                b.delay(retry, Duration::ZERO, 0.5),
                Duration::ZERO,
                "{retry}"
            );
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn constant_linear_exponential_without_jitter() {
        let c = Backoff::constant(100 * MS);
        let l = Backoff::linear(100 * MS).with_jitter(Jitter::None);
        let e = Backoff::exponential(100 * MS)
            .with_jitter(Jitter::None)
            .with_max_delay(500 * MS);
        let take = |b: &Backoff| {
            (1..=4)
                .map(|n| b.delay(n, Duration::ZERO, 0.9))
                .collect::<Vec<_>>()
        };
        assert_eq!(take(&c), [100 * MS, 100 * MS, 100 * MS, 100 * MS]);
        assert_eq!(take(&l), [100 * MS, 200 * MS, 300 * MS, 400 * MS]);
        assert_eq!(take(&e), [100 * MS, 200 * MS, 400 * MS, 500 * MS]);
    }

    #[test]
    fn huge_retry_numbers_saturate_at_the_cap() {
        let e = Backoff::exponential(MS)
            .with_factor(10.0)
            .with_jitter(Jitter::None);
        assert_eq!(e.delay(u32::MAX, Duration::ZERO, 0.0), MAX_BACKOFF);
        let l = Backoff::linear(Duration::from_secs(3600)).with_jitter(Jitter::None);
        assert_eq!(l.delay(u32::MAX, Duration::ZERO, 0.0), MAX_BACKOFF);
    }

    #[test]
    fn invalid_values_are_config_errors() {
        let base = Backoff::exponential(100 * MS);
        for factor in [0.0, -1.0, 0.5, f64::NAN, f64::INFINITY] {
            let err = base.with_factor(factor).validate().unwrap_err();
            assert_eq!(err.field(), "retry.backoff.factor", "{factor}");
        }
        let err = base.with_max_delay(10 * MS).validate().unwrap_err();
        assert_eq!(err.field(), "retry.backoff.max_delay");
        assert!(Backoff::default().validate().is_ok());
    }

    #[test]
    fn full_and_equal_jitter_span_their_ranges() {
        let b = Backoff::constant(100 * MS);
        assert_eq!(
            b.with_jitter(Jitter::Full).delay(1, Duration::ZERO, 0.0),
            Duration::ZERO
        );
        assert_eq!(
            b.with_jitter(Jitter::Full).delay(1, Duration::ZERO, 1.0),
            100 * MS
        );
        assert_eq!(
            b.with_jitter(Jitter::Equal).delay(1, Duration::ZERO, 0.0),
            50 * MS
        );
        assert_eq!(
            b.with_jitter(Jitter::Equal).delay(1, Duration::ZERO, 1.0),
            100 * MS
        );
    }

    #[test]
    fn longest_bounds_every_delay_whatever_the_jitter() {
        for jitter in [
            Jitter::None,
            Jitter::Full,
            Jitter::Equal,
            Jitter::Decorrelated,
        ] {
            let b = Backoff::exponential(100 * MS)
                .with_max_delay(2000 * MS)
                .with_jitter(jitter);
            let mut prev = Duration::ZERO;
            for retry in 1..=8 {
                // The top of the range, every time: the largest the schedule can grow.
                let d = b.delay(retry, prev, 1.0);
                assert!(d <= b.longest(retry), "{jitter:?} retry {retry}: {d:?}");
                prev = d;
            }
            assert_eq!(b.longest(20), 2000 * MS, "{jitter:?}");
        }
        let b = Backoff::exponential(100 * MS)
            .with_max_delay(2000 * MS)
            .with_jitter(Jitter::Decorrelated);
        assert_eq!(b.longest(1), 300 * MS);
        assert_eq!(b.longest(2), 900 * MS);
        assert_eq!(b.longest(3), 2000 * MS);
        assert_eq!(b.with_jitter(Jitter::Full).longest(3), 400 * MS);
        let zero = Backoff::exponential(Duration::ZERO).with_jitter(Jitter::Decorrelated);
        assert_eq!(zero.longest(u32::MAX), Duration::ZERO);
    }

    #[test]
    fn decorrelated_jitter_grows_from_the_previous_delay() {
        let b = Backoff::exponential(100 * MS)
            .with_max_delay(Duration::from_secs(1))
            .with_jitter(Jitter::Decorrelated);
        assert_eq!(b.delay(1, Duration::ZERO, 0.0), 100 * MS);
        assert_eq!(b.delay(2, 200 * MS, 1.0), 600 * MS);
        assert_eq!(b.delay(3, 600 * MS, 1.0), Duration::from_secs(1));
    }

    #[test]
    fn seeded_rng_is_deterministic_and_in_range() {
        let a = JitterRng::seeded(7);
        let b = JitterRng::seeded(7);
        for _ in 0..1000 {
            let x = a.next_unit();
            assert_eq!(x, b.next_unit());
            assert!((0.0..1.0).contains(&x));
        }
    }
}
