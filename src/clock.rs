//! A cheap clock for hot paths that can live with an error of a few milliseconds.
//!
//! `tokio::time::Instant::now()` reads `CLOCK_MONOTONIC`, about 20–30 ns on the
//! machines we measure on. `CLOCK_MONOTONIC_COARSE` costs about 5–7 ns: it returns the
//! time of the last timer tick, so it lags the precise clock by less than one tick
//! (1–10 ms for any kernel `HZ`). Aligned to a precise timeline by one pair of reads, it
//! is within one tick of that timeline either way. The breaker uses it where that is
//! harmless: to pick a time-window bucket, and to reject while a break is certainly not
//! over (the last [`SLACK_NS`] of a break are checked with the precise clock, so a probe
//! is never admitted early).
//!
//! Tests pause tokio's clock, which the coarse clock cannot see. [`Coarse::detect`]
//! therefore falls back to tokio's clock whenever tokio's clock is paused (two reads
//! a tick of the system clock apart return the same instant, which an unpaused clock
//! never does), and
//! on platforms other than Linux.

use std::time::Duration;
use tokio::time::Instant;

/// `now + d`, or about a century from `now` for a `d` too large for the clock (a
/// `Duration::MAX` timeout or ttl means "no limit"), never a panic: `Instant + Duration`
/// panics on overflow.
pub(crate) fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// How far the aligned coarse clock may be from the precise one, with a margin: the
/// largest tick is 10 ms (`HZ=100`).
pub(crate) const SLACK_NS: u64 = 20_000_000;

/// The coarse clock, aligned with a precise timeline (ns since some origin).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coarse {
    /// Coarse reading minus precise reading at alignment (wrapping).
    offset: u64,
}

impl Coarse {
    /// A coarse clock aligned with the timeline `precise_ns` reads, or `None` when
    /// tokio's clock is paused or the platform has no coarse clock.
    ///
    /// Aligned from a coarse reading taken between two precise ones less than a
    /// millisecond apart (a few tries): the thread paused between the readings (a
    /// loaded machine) would skew the clock by the pause for the rest of its life, and
    /// let a breaker admit a probe that much before its break is over.
    pub(crate) fn detect(precise_ns: impl Fn() -> u64) -> Option<Self> {
        if tokio_clock_is_paused() {
            return None;
        }
        let mut aligned = None;
        for _ in 0..8 {
            let before = precise_ns();
            let c = raw_ns()?;
            let after = precise_ns();
            let mid = before + after.saturating_sub(before) / 2;
            aligned = Some(Self {
                offset: c.wrapping_sub(mid),
            });
            if after.saturating_sub(before) < 1_000_000 {
                break;
            }
        }
        aligned
    }

    /// Now on the precise timeline, within [`SLACK_NS`] of it.
    #[inline]
    pub(crate) fn now_ns(self) -> u64 {
        raw_now().wrapping_sub(self.offset)
    }

    /// The raw coarse reading before which the precise time is certainly still before
    /// `precise_ns`: compare [`raw_now`] with it and no offset is needed. Zero (never
    /// before) when that reading would be at or before the coarse clock's zero.
    pub(crate) fn raw_deadline(self, precise_ns: u64) -> u64 {
        // The offset is a wrapping difference: read it as signed.
        let raw = i128::from(precise_ns) + i128::from(self.offset as i64) - i128::from(SLACK_NS);
        u64::try_from(raw).unwrap_or(0)
    }
}

/// The raw coarse clock (ns, its own origin), to compare with a
/// [`Coarse::raw_deadline`]; zero where there is no coarse clock.
#[inline]
pub(crate) fn raw_now() -> u64 {
    raw_ns().unwrap_or(0)
}

/// Whether tokio's clock is paused: two of its reads with a tick of the system's
/// monotonic clock between them are equal. (Two reads in a row can be equal on a clock
/// with a coarse tick, about 42 ns on Apple silicon, 100 ns on Windows: the wait for
/// the tick makes "equal" mean "paused" there too.)
#[expect(
    clippy::disallowed_types,
    reason = "the system's clock, which tokio's pause does not stop, is the point here"
)]
pub(crate) fn tokio_clock_is_paused() -> bool {
    let a = Instant::now();
    let tick = std::time::Instant::now();
    while std::time::Instant::now() == tick {
        std::hint::spin_loop();
    }
    a == Instant::now()
}

#[cfg(any(target_os = "linux", target_os = "android"))]
#[inline]
fn raw_ns() -> Option<u64> {
    // 32.32 fixed-point seconds to nanoseconds.
    let t = coarsetime::Instant::now_without_cache_update().as_ticks();
    let (secs, frac) = (t >> 32, t & 0xffff_ffff);
    Some(secs * 1_000_000_000 + ((frac * 1_000_000_000) >> 32))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
#[inline]
fn raw_ns() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clock_stays_within_the_slack_of_tokio_clock() {
        let origin = Instant::now();
        let ns = || origin.elapsed().as_nanos() as u64;
        let Some(coarse) = Coarse::detect(ns) else {
            return; // not Linux: nothing to check
        };
        for _ in 0..200_000 {
            let before = ns();
            let c = coarse.now_ns();
            let after = ns();
            assert!(c <= after + SLACK_NS, "coarse {c} too far ahead of {after}");
            assert!(c + SLACK_NS >= before, "coarse {c} too far behind {before}");
        }
    }

    /// A pause of the thread between the readings that align the coarse clock (here
    /// 60 ms, as if the thread were preempted) does not skew it: the alignment is
    /// taken again from readings close together.
    #[test]
    fn a_pause_while_aligning_does_not_skew_the_coarse_clock() {
        let origin = Instant::now();
        let ns = || origin.elapsed().as_nanos() as u64;
        let calls = std::cell::Cell::new(0u32);
        let paused_once = || {
            calls.set(calls.get() + 1);
            // The second reading (after the first coarse one) comes 60 ms "late".
            ns() + if calls.get() == 2 { 60_000_000 } else { 0 }
        };
        let Some(coarse) = Coarse::detect(paused_once) else {
            return; // not Linux: nothing to check
        };
        assert!(calls.get() > 2, "aligned from the paused readings");
        for _ in 0..1000 {
            let before = ns();
            let c = coarse.now_ns();
            let after = ns();
            assert!(c <= after + SLACK_NS, "coarse {c} too far ahead of {after}");
            assert!(c + SLACK_NS >= before, "coarse {c} too far behind {before}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn paused_tokio_clock_disables_the_coarse_clock() {
        assert!(Coarse::detect(|| 0).is_none());
    }

    #[tokio::test]
    async fn running_tokio_clock_enables_the_coarse_clock_on_linux() {
        let on_linux = cfg!(any(target_os = "linux", target_os = "android"));
        assert_eq!(Coarse::detect(|| 0).is_some(), on_linux);
    }
}
