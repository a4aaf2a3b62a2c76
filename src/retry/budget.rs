//! A retry budget: retries allowed as a share of recent first attempts, plus a floor.
//!
//! The shape of Finagle's `RetryBudget`: every first attempt deposits, every retry
//! withdraws, and deposits and withdrawals expire after a time window (`ttl`). Over any
//! window, retries are bounded by
//!
//! ```text
//! retries ≤ ratio × first_attempts + min_retries_per_sec × ttl
//! ```
//!
//! so a dependency that fails every call sees at most `1 + ratio` times its normal load
//! (plus the floor), instead of `1 + max_retries` times (a retry storm).
//!
//! Pure code over an explicit `now`; lock-free. The window is split into ten slots, each
//! an atomic packing `(slot epoch, count)`, so entries expire in steps of `ttl / 10`.
//! Under contention two callers may both see the last token and both retry: the bound
//! can be overshot by the number of racing callers, never more.
//!
//! The retry layer deposits with [`RetryBudget::deposit_with`], which reads the coarse
//! clock (`CLOCK_MONOTONIC_COARSE`, a few ns) where there is one: a deposit is counted
//! in the slot of its own time, give or take a timer tick.
//!
//! Retries cost whole units and deposits earn `ratio` of one in millionths, so a ratio
//! with up to six decimals is exact: 15% of 20 first attempts is 3 retries.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use postbox::retry::RetryBudget;
//! use tokio::time::Instant;
//!
//! # fn main() -> Result<(), postbox::error::ConfigError> {
//! let budget = RetryBudget::builder()
//!     .ratio(0.2)
//!     .min_retries_per_sec(0)
//!     .ttl(Duration::from_secs(10))
//!     .build()?;
//! let now = Instant::now();
//! for _ in 0..10 {
//!     budget.deposit(now);
//! }
//! assert!(budget.try_withdraw(now));
//! assert!(budget.try_withdraw(now));
//! assert!(!budget.try_withdraw(now)); // 20% of 10 is 2
//! # Ok(()) }
//! ```

use crate::clock::Coarse;
use crate::error::ConfigError;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

const SLOTS: usize = 10;
/// A retry costs this many units; a deposit earns `ratio × SCALE` (millionths).
const SCALE: u64 = 1_000_000;

/// A retry budget shared by every clone (an `Arc` inside): clone it into several layers
/// to share one budget between them.
///
/// Defaults: 20% of first attempts, a floor of 10 retries per second, a 10 s window
/// (Finagle's defaults).
///
/// A retry is withdrawn when it is decided, before its backoff: a call dropped during
/// the backoff (its caller gave up) has spent it all the same. So the budget counts
/// retries decided, a little more than retries sent when callers cancel often.
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    origin: Instant,
    slot_nanos: u64,
    /// Units one deposit earns (`ratio × SCALE`, at least 1), or `None` when the ratio
    /// is zero.
    earning: Option<u64>,
    /// Retries always allowed per window (`min_retries_per_sec × ttl`).
    reserve: u64,
    ratio: f64,
    min_retries_per_sec: u32,
    ttl: Duration,
    deposits: Window,
    withdrawals: Window,
    /// The coarse clock aligned with `origin`, decided at the first
    /// [`RetryBudget::deposit_with`]: `None` inside when tokio's clock is paused (tests)
    /// or the platform has none.
    coarse: OnceLock<Option<Coarse>>,
}

/// Builds a [`RetryBudget`], validating the values.
#[derive(Debug, Clone)]
pub struct RetryBudgetBuilder {
    ratio: f64,
    min_retries_per_sec: u32,
    ttl: Duration,
}

// === impl RetryBudget ===

impl RetryBudget {
    /// The default budget: 20%, 10 retries per second, a 10 s window.
    pub fn new() -> Self {
        Self::builder()
            .build()
            .expect("the default budget is valid")
    }

    /// A builder starting from the defaults.
    pub const fn builder() -> RetryBudgetBuilder {
        RetryBudgetBuilder {
            ratio: 0.2,
            min_retries_per_sec: 10,
            ttl: Duration::from_secs(10),
        }
    }

    /// Records a first attempt at `now`.
    pub fn deposit(&self, now: Instant) {
        self.inner.deposits.add(self.inner.epoch(now));
    }

    /// Records a first attempt now, read from the coarse clock where there is one (a
    /// few ns, where `now()` costs 20–30), else from `now()`.
    ///
    /// What the retry layer uses: a precise clock read costs more than everything else
    /// a deposit does. A coarse reading is within a timer tick (at most 20 ms) of the
    /// precise time, so a deposit near a slot boundary may be counted in the
    /// neighbouring slot.
    pub fn deposit_with(&self, now: impl FnOnce() -> Instant) {
        let inner = &*self.inner;
        let coarse = match inner.coarse.get() {
            Some(c) => *c,
            None => inner.detect_coarse(),
        };
        let epoch = match coarse {
            Some(c) => inner.epoch_of(c.now_ns()),
            None => inner.epoch(now()),
        };
        inner.deposits.add(epoch);
    }

    /// Takes one retry from the budget at `now`; `false` if the budget is spent.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let inner = &*self.inner;
        let epoch = inner.epoch(now);
        let retries = inner.withdrawals.sum(epoch);
        if retries < inner.reserve {
            inner.withdrawals.add(epoch);
            return true;
        }
        let Some(earning) = inner.earning else {
            return false;
        };
        let balance = inner.deposits.sum(epoch).saturating_mul(earning);
        let spent = (retries - inner.reserve + 1).saturating_mul(SCALE);
        if spent <= balance {
            inner.withdrawals.add(epoch);
            true
        } else {
            false
        }
    }

    /// The retries the budget would allow at `now`.
    pub fn available(&self, now: Instant) -> u64 {
        let inner = &*self.inner;
        let epoch = inner.epoch(now);
        let retries = inner.withdrawals.sum(epoch);
        let earned = match inner.earning {
            Some(earning) => inner.deposits.sum(epoch).saturating_mul(earning) / SCALE,
            None => 0,
        };
        (inner.reserve + earned).saturating_sub(retries)
    }

    /// The share of first attempts that may be retried.
    pub fn ratio(&self) -> f64 {
        self.inner.ratio
    }

    /// The floor of retries per second.
    pub fn min_retries_per_sec(&self) -> u32 {
        self.inner.min_retries_per_sec
    }

    /// The window after which deposits and withdrawals expire.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// `true` if both handles share one budget.
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.inner.ratio)
            .field("min_retries_per_sec", &self.inner.min_retries_per_sec)
            .field("ttl", &self.inner.ttl)
            .finish_non_exhaustive()
    }
}

impl Inner {
    #[cold]
    fn detect_coarse(&self) -> Option<Coarse> {
        *self
            .coarse
            .get_or_init(|| Coarse::detect(|| self.nanos(Instant::now())))
    }

    /// Nanoseconds since the origin. u64 nanoseconds cover 584 years; a u128 division
    /// would cost far more.
    fn nanos(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin);
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    }

    fn epoch(&self, now: Instant) -> u32 {
        self.epoch_of(self.nanos(now))
    }

    /// The slot epoch of `nanos` since the origin. It wraps after 2^32 slots, 13.6
    /// years at the shortest ttl (1 s); the windows compare epochs with wrapping
    /// arithmetic, and only the window at the wrap counts short.
    fn epoch_of(&self, nanos: u64) -> u32 {
        (nanos / self.slot_nanos) as u32
    }
}

// === impl RetryBudgetBuilder ===

impl RetryBudgetBuilder {
    /// The share of first attempts that may be retried, in `[0, 1000]` (0.2 = 20%).
    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// Retries always allowed per second, whatever the traffic (0 for none): a reserve
    /// of `n × ttl` per window, as Finagle's, usable in a burst (with the defaults, 100
    /// retries at once, then none until the window moves on).
    pub fn min_retries_per_sec(mut self, n: u32) -> Self {
        self.min_retries_per_sec = n;
        self
    }

    /// How long a deposit or withdrawal counts (1 s to 1 hour).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Validates and builds the budget.
    ///
    /// # Errors
    /// A ratio that is not finite, negative or above 1000, or a ttl outside 1 s to 1 hour.
    pub fn build(self) -> Result<RetryBudget, ConfigError> {
        if !self.ratio.is_finite() || !(0.0..=1000.0).contains(&self.ratio) {
            return Err(ConfigError::new(
                "retry.budget.ratio",
                "must be a number between 0 and 1000 (0.2 = 20%)",
            ));
        }
        if self.ttl < Duration::from_secs(1) || self.ttl > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "retry.budget.ttl",
                "must be between 1 s and 1 hour",
            ));
        }
        // A ratio below one millionth earns one millionth.
        let earning =
            (self.ratio > 0.0).then(|| ((self.ratio * SCALE as f64).round() as u64).max(1));
        let reserve = (f64::from(self.min_retries_per_sec) * self.ttl.as_secs_f64()) as u64;
        Ok(RetryBudget {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                slot_nanos: u64::try_from((self.ttl / SLOTS as u32).as_nanos()).unwrap_or(u64::MAX),
                earning,
                reserve,
                ratio: self.ratio,
                min_retries_per_sec: self.min_retries_per_sec,
                ttl: self.ttl,
                deposits: Window::new(),
                withdrawals: Window::new(),
                coarse: OnceLock::new(),
            }),
        })
    }
}

/// Ten slots of `(epoch: u32, count: u32)` packed in one atomic each.
struct Window {
    slots: [AtomicU64; SLOTS],
}

impl Window {
    fn new() -> Self {
        Self {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Adds one at `epoch`; returns the slot's new count.
    fn add(&self, epoch: u32) -> u32 {
        let slot = &self.slots[epoch as usize % SLOTS];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let (e, n) = unpack(cur);
            // A slot holding an older epoch is stale: restart it at ours. One holding a
            // newer epoch (our `now` was read before another thread's) keeps its epoch
            // and takes our count: a late writer must not wipe out the newest slot.
            let next = if is_newer(epoch, e) {
                pack(epoch, 1)
            } else {
                pack(e, n.saturating_add(1))
            };
            match slot.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return unpack(next).1,
                Err(actual) => cur = actual,
            }
        }
    }

    fn sum(&self, epoch: u32) -> u64 {
        self.slots
            .iter()
            .map(|s| {
                let (e, n) = unpack(s.load(Ordering::Acquire));
                // Counts within the last SLOTS epochs (the current one included), and
                // those of a slot a writer whose clock read was later than ours has
                // already moved on.
                if epoch.wrapping_sub(e) < SLOTS as u32 || e.wrapping_sub(epoch) < SLOTS as u32 {
                    u64::from(n)
                } else {
                    0
                }
            })
            .sum()
    }
}

/// `true` if epoch `a` is later than `b` (wrapping: within half the epoch range).
const fn is_newer(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < u32::MAX / 2
}

const fn pack(epoch: u32, n: u32) -> u64 {
    ((epoch as u64) << 32) | n as u64
}

const fn unpack(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, floor: u32) -> RetryBudget {
        RetryBudget::builder()
            .ratio(ratio)
            .min_retries_per_sec(floor)
            .ttl(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    #[test]
    fn twenty_percent_of_ten_first_attempts_is_two_retries() {
        let b = budget(0.2, 0);
        let now = Instant::now();
        for _ in 0..10 {
            b.deposit(now);
        }
        assert_eq!(b.available(now), 2);
        assert!(b.try_withdraw(now));
        assert!(b.try_withdraw(now));
        assert!(!b.try_withdraw(now));
        assert_eq!(b.available(now), 0);
    }

    /// A deposit whose `now` was read a window ago (before an await, on a slow thread)
    /// lands in the slot the newest epoch holds: it must not restart that slot and
    /// throw away the deposits made since.
    #[test]
    fn a_late_deposit_does_not_wipe_out_the_newest_slot() {
        let b = budget(0.2, 0);
        let t0 = Instant::now();
        // ttl 10 s: ten 1 s slots; epoch 10 and epoch 0 share a slot.
        let now = t0 + Duration::from_millis(10_500);
        for _ in 0..10 {
            b.deposit(now);
        }
        b.deposit(t0 + Duration::from_millis(500));
        // 11 deposits at 20%: 2 retries.
        assert_eq!(b.available(now), 2);
    }

    /// A reader whose clock read is a slot behind a writer's still sees what the writer
    /// deposited.
    #[test]
    fn a_reader_a_slot_behind_sees_the_newest_deposits() {
        let b = budget(0.2, 0);
        let t0 = Instant::now();
        for _ in 0..10 {
            b.deposit(t0 + Duration::from_millis(1_500));
        }
        let earlier = t0 + Duration::from_millis(500);
        assert_eq!(b.available(earlier), 2);
        assert!(b.try_withdraw(earlier));
    }

    #[test]
    fn floor_allows_retries_without_traffic() {
        let b = budget(0.2, 1);
        let now = Instant::now();
        // 1/s over a 10 s window: 10 retries.
        for _ in 0..10 {
            assert!(b.try_withdraw(now));
        }
        assert!(!b.try_withdraw(now));
    }

    #[test]
    fn zero_ratio_and_zero_floor_allows_nothing() {
        let b = budget(0.0, 0);
        let now = Instant::now();
        for _ in 0..100 {
            b.deposit(now);
        }
        assert!(!b.try_withdraw(now));
    }

    #[test]
    fn deposits_and_withdrawals_expire_after_the_ttl() {
        let b = budget(0.5, 0);
        let t0 = Instant::now();
        b.deposit(t0);
        b.deposit(t0);
        assert!(b.try_withdraw(t0));
        assert!(!b.try_withdraw(t0));
        let later = t0 + Duration::from_secs(11);
        assert!(!b.try_withdraw(later), "the deposits expired");
        b.deposit(later);
        b.deposit(later);
        assert!(b.try_withdraw(later), "the old withdrawal expired too");
    }

    #[test]
    fn invalid_values_are_config_errors() {
        for r in [-0.1, f64::NAN, f64::INFINITY, 1001.0] {
            let e = RetryBudget::builder().ratio(r).build().unwrap_err();
            assert_eq!(e.field(), "retry.budget.ratio");
        }
        let e = RetryBudget::builder()
            .ttl(Duration::from_millis(10))
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "retry.budget.ttl");
    }

    #[test]
    fn clones_share_one_budget() {
        let a = budget(0.2, 0);
        let b = a.clone();
        let now = Instant::now();
        for _ in 0..5 {
            a.deposit(now);
        }
        assert!(b.try_withdraw(now));
        assert!(!a.try_withdraw(now));
        assert!(a.ptr_eq(&b));
    }

    /// At a low rate (2 first attempts a second, no floor) every deposit counts in its
    /// own slot: the last ten seconds always hold 20 of them, 4 retries at 20%. (The
    /// clock used to be read once per 32 deposits, which filed 16 s of deposits under
    /// the first slot, where they had expired: no retry at all from t = 10 s.)
    #[tokio::test(start_paused = true)]
    async fn deposits_at_a_low_rate_count_for_the_whole_ttl() {
        let b = budget(0.2, 0);
        for i in 0..40 {
            if i > 0 {
                tokio::time::advance(Duration::from_millis(500)).await;
            }
            b.deposit_with(Instant::now);
        }
        assert_eq!(b.available(Instant::now()), 4);
    }

    /// The production path: an unpaused clock, so `deposit_with` reads the coarse clock
    /// (on Linux) and its deposits count where `available` (the precise clock) looks.
    #[test]
    fn deposits_read_from_the_coarse_clock_count_now() {
        let b = budget(0.2, 0);
        for _ in 0..10 {
            b.deposit_with(Instant::now);
        }
        assert_eq!(b.available(Instant::now()), 2);
    }

    /// Whole retries from fractional ratios, exactly: a retry used to cost a rounded
    /// `1000 / ratio` units (6667 at 15%), one short of 3 retries for 20 deposits.
    #[test]
    fn fifteen_percent_of_twenty_first_attempts_is_three_retries() {
        for (ratio, deposits, retries) in [(0.15, 20, 3), (0.7, 10, 7), (400.0, 1, 400)] {
            let b = budget(ratio, 0);
            let now = Instant::now();
            for _ in 0..deposits {
                b.deposit(now);
            }
            assert_eq!(b.available(now), retries, "{ratio} of {deposits}");
            for _ in 0..retries {
                assert!(b.try_withdraw(now), "{ratio} of {deposits}");
            }
            assert!(!b.try_withdraw(now), "{ratio} of {deposits}");
        }
    }
}
