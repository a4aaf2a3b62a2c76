//! Sliding windows of call outcomes: the last N calls (count) or the last T (time).
//!
//! Both are pure (time is passed in as nanoseconds since the breaker's origin), O(1)
//! per recorded outcome, allocate only when built, and may be shared by many threads:
//! they are made of atomics. Under concurrency the totals are eventually exact (every
//! change of a slot or bucket is applied to the running totals exactly once); a reader
//! racing a writer may see one outcome more or less, never a drifting total.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering::*, fence};

/// Outcome bit: the call failed (failure or overload).
pub(crate) const FAILURE: u8 = 1;
/// Outcome bit: the call was slower than the slow-call threshold.
pub(crate) const SLOW: u8 = 2;

/// What a window holds at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

/// Clamps a running total that a racing writer may have pushed out of range.
fn clamp(v: i64, max: u64) -> u64 {
    (v.max(0) as u64).min(max)
}

/// Applies the change of one slot or bucket from `old` to `new` outcome bits.
#[inline]
///
/// Released, after the call that carries the outcome was counted: a reader that loads
/// the outcomes first (acquiring) never sees an outcome whose call it does not see, so
/// never a rate that no moment had.
fn apply(failures: &AtomicI64, slow: &AtomicI64, old: u8, new: u8) {
    let changed = old ^ new;
    if changed & FAILURE != 0 {
        failures.fetch_add(if new & FAILURE != 0 { 1 } else { -1 }, Release);
    }
    if changed & SLOW != 0 {
        slow.fetch_add(if new & SLOW != 0 { 1 } else { -1 }, Release);
    }
}

// === impl CountWindow ===

/// Slot bit of [`CountWindow`]: the slot holds an outcome. The calls are counted from
/// the slots themselves, so a reset that sweeps a slot takes its call and its failure
/// away together: a writer racing a reset can never leave a failure with no call.
const OCCUPIED: u8 = 4;

/// A true sliding count window: a ring of the last `size` outcomes with running
/// totals of calls, failures and slow calls.
#[derive(Debug)]
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    /// Outcomes recorded since the last reset; the next one goes to `next % size`.
    next: AtomicU64,
    /// Occupied slots.
    calls: AtomicI64,
    failures: AtomicI64,
    slow: AtomicI64,
}

impl CountWindow {
    /// A window of the last `size` outcomes (`size >= 1`).
    pub(crate) fn new(size: u32) -> Self {
        let size = size.max(1);
        Self {
            slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
            next: AtomicU64::new(0),
            calls: AtomicI64::new(0),
            failures: AtomicI64::new(0),
            slow: AtomicI64::new(0),
        }
    }

    /// Applies the change of one slot from `old` to `new` (occupied and outcome bits).
    #[inline]
    fn apply_slot(&self, old: u8, new: u8) {
        let occupancy = (old ^ new) & OCCUPIED != 0;
        if occupancy && new & OCCUPIED != 0 {
            // A new call is counted before its outcome (see `apply`).
            self.calls.fetch_add(1, Relaxed);
            apply(&self.failures, &self.slow, old, new);
        } else {
            apply(&self.failures, &self.slow, old, new);
            if occupancy {
                self.calls.fetch_sub(1, Relaxed);
            }
        }
    }

    /// The number of outcomes the window holds when full.
    pub(crate) fn size(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Records one outcome (a combination of [`FAILURE`] and [`SLOW`] bits).
    #[inline]
    pub(crate) fn record(&self, outcome: u8) {
        let size = self.size();
        // A full window whose every slot already holds this outcome (all successes,
        // or all plain failures) stays the same when one more arrives: which slot is
        // overwritten is unobservable. Skipping the write keeps the steady states to
        // three loads.
        let same = match outcome {
            0 => self.failures.load(Relaxed) == 0,
            FAILURE => self.failures.load(Relaxed) == size as i64,
            _ => false,
        };
        if same && self.slow.load(Relaxed) == 0 && self.calls.load(Relaxed) >= size as i64 {
            return;
        }
        self.write(self.next.fetch_add(1, Relaxed), outcome);
    }

    /// Writes `outcome` at position `pos` (taken from `next`, perhaps before a reset).
    #[inline]
    fn write(&self, pos: u64, outcome: u8) {
        let slot = &self.slots[(pos % self.size()) as usize];
        let value = outcome | OCCUPIED;
        if slot.load(Relaxed) == value {
            return;
        }
        let old = slot.swap(value, Relaxed);
        self.apply_slot(old, value);
    }

    /// The current totals.
    ///
    /// The outcomes are loaded before the calls: a call recorded meanwhile can only
    /// lower the rate read, never raise it past one the window had (a failure seen
    /// without its call would: 9 failures in 20 calls, then 10 in 21, read as 10 in 20).
    pub(crate) fn totals(&self) -> Totals {
        let failures = self.failures.load(Acquire);
        let slow = self.slow.load(Acquire);
        let calls = clamp(self.calls.load(Relaxed), self.size());
        Totals {
            calls,
            failures: clamp(failures, calls),
            slow: clamp(slow, calls),
        }
    }

    /// Forgets every outcome.
    pub(crate) fn reset(&self) {
        for s in self.slots.iter() {
            let old = s.swap(0, Relaxed);
            self.apply_slot(old, 0);
        }
        self.next.store(0, Relaxed);
    }
}

// === impl TimeWindow ===

#[derive(Debug, Default)]
struct Bucket {
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

impl Bucket {
    /// The outcomes before the calls, as [`CountWindow::totals`] and for the same
    /// reason (`record` counts a call before its outcome).
    fn load(&self) -> [u64; 3] {
        let failures = self.failures.load(Acquire);
        let slow = self.slow.load(Acquire);
        [self.calls.load(Relaxed), failures, slow]
    }

    fn clear(&self) {
        self.calls.store(0, Release);
        self.failures.store(0, Release);
        self.slow.store(0, Release);
    }
}

/// Ends a [`TimeWindow`]'s write section: the sequence even again.
struct WriteSection<'a>(&'a AtomicU64);

impl Drop for WriteSection<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Release);
    }
}

/// Rotation state, behind the rotation lock.
#[derive(Debug)]
struct Folded {
    /// Per bucket: how much of it is counted in the closed totals.
    counted: Box<[[u64; 3]]>,
}

/// A sliding time window: `buckets` buckets of `width` each, with running totals.
///
/// An outcome recorded in the bucket starting at `b` leaves the window at exactly
/// `b + buckets × width`: the window covers the last T = `buckets × width` at the
/// granularity of one bucket (as resilience4j and Polly do).
///
/// Recording is one `fetch_add` on the newest bucket (two for a failure). The running
/// totals cover the older buckets only and change when the head moves on (at most once
/// per bucket width, under a lock): the bucket it leaves is folded in, the buckets that
/// leave the window are taken out. Totals are those plus the newest bucket: O(1) too.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    buckets: Box<[Bucket]>,
    width_ns: u64,
    /// `epoch << 16 | epoch % buckets` of the newest bucket (epoch = time / width).
    head: AtomicU64,
    /// When the newest bucket ends (ns): before it, no division and no rotation.
    head_end_ns: AtomicU64,
    /// Totals of the buckets older than the head that are still inside the window.
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
    /// Odd while a rotation (or a reset) changes the totals and clears buckets: a
    /// reader that saw it odd, or changed, reads again (a sequence lock), so it never
    /// sees a bucket's calls gone and its failures still counted.
    seq: AtomicU64,
    /// Serialises rotation (once per bucket width at most) and holds what was folded.
    rotate: Mutex<Folded>,
}

/// At most this many buckets: the bucket index is packed in 16 bits.
pub(crate) const MAX_BUCKETS: u32 = 1 << 16;

impl TimeWindow {
    /// A window of `buckets` buckets of `width_ns` nanoseconds each (both ≥ 1,
    /// `buckets` < [`MAX_BUCKETS`]).
    pub(crate) fn new(buckets: u32, width_ns: u64) -> Self {
        let buckets = buckets.clamp(1, MAX_BUCKETS - 1);
        Self {
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
            width_ns: width_ns.max(1),
            head: AtomicU64::new(0),
            head_end_ns: AtomicU64::new(width_ns.max(1)),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            rotate: Mutex::new(Folded {
                counted: vec![[0; 3]; buckets as usize].into_boxed_slice(),
            }),
        }
    }

    fn len(&self) -> u64 {
        self.buckets.len() as u64
    }

    /// Moves the head to the bucket of `now_ns`, expiring buckets that left the window,
    /// and returns the head bucket's index, and whether calls left the window. A caller
    /// whose `now` is older than the head (it read the clock, then lost the CPU) is
    /// counted in the head bucket.
    #[inline]
    fn advance(&self, now_ns: u64) -> (usize, bool) {
        // The end first, then the head: a rotation stores them the other way round, so
        // a head read after an end that covers `now_ns` is that end's head or a later
        // one. (Read head first, a rotation in between gave the old head with the new
        // end: an outcome of the new bucket went into one already folded, unseen by
        // its own check, and lost when that bucket expired, at the next rotation with
        // two buckets.)
        let end = self.head_end_ns.load(Acquire);
        #[cfg(test)]
        tests::between_loads();
        let head = self.head.load(Acquire);
        if now_ns < end {
            // (A writer whose clock read came before a rotation may count into the
            // previous bucket, its own: the next rotation folds it in, if it is still
            // inside the window.)
            return ((head & 0xffff) as usize, false);
        }
        self.rotate_to(now_ns / self.width_ns)
    }

    #[cold]
    fn rotate_to(&self, epoch: u64) -> (usize, bool) {
        let mut folded = self.rotate.lock().unwrap_or_else(|e| e.into_inner());
        let head = self.head.load(Acquire);
        let from = head >> 16;
        if from >= epoch {
            return ((head & 0xffff) as usize, false);
        }
        let mut expired = false;
        let n = self.len();
        let _writing = self.write_section();
        // Expire the buckets the head passes over (at most all of them): take out what
        // was counted of them, and empty them.
        let first = if epoch - from >= n {
            epoch - n + 1
        } else {
            from + 1
        };
        for e in first..=epoch {
            let i = (e % n) as usize;
            let counted = std::mem::take(&mut folded.counted[i]);
            expired |= counted[0] > 0;
            self.sub(counted);
            self.buckets[i].clear();
        }
        // Fold in what the buckets still inside gained since they were last folded:
        // the old head, and any late writer's outcome in an older one.
        for e in epoch.saturating_sub(n - 1)..first {
            let i = (e % n) as usize;
            let now = self.buckets[i].load();
            let counted = &mut folded.counted[i];
            self.add([
                now[0].saturating_sub(counted[0]),
                now[1].saturating_sub(counted[1]),
                now[2].saturating_sub(counted[2]),
            ]);
            *counted = now;
        }
        let idx = epoch % n;
        // The head before its end (see `advance`).
        self.head.store(epoch << 16 | idx, Release);
        self.head_end_ns
            .store((epoch + 1).saturating_mul(self.width_ns), Release);
        (idx as usize, expired)
    }

    fn add(&self, [c, f, s]: [u64; 3]) {
        self.calls.fetch_add(c, Relaxed);
        self.failures.fetch_add(f, Relaxed);
        self.slow.fetch_add(s, Relaxed);
    }

    fn sub(&self, [c, f, s]: [u64; 3]) {
        self.calls.fetch_sub(c, Relaxed);
        self.failures.fetch_sub(f, Relaxed);
        self.slow.fetch_sub(s, Relaxed);
    }

    /// Records one outcome at `now_ns`.
    #[inline]
    /// Records one outcome at `now_ns`; `true` if calls left the window meanwhile.
    pub(crate) fn record(&self, now_ns: u64, outcome: u8) -> bool {
        let (head, expired) = self.advance(now_ns);
        let b = &self.buckets[head];
        // The call first, its outcome released after it (see `Bucket::load`).
        b.calls.fetch_add(1, Relaxed);
        if outcome & FAILURE != 0 {
            b.failures.fetch_add(1, Release);
        }
        if outcome & SLOW != 0 {
            b.slow.fetch_add(1, Release);
        }
        expired
    }

    /// The totals over the window ending at `now_ns`.
    #[cfg(test)]
    fn totals(&self, now_ns: u64) -> Totals {
        self.totals_expiring(now_ns).0
    }

    /// The totals over the window ending at `now_ns`, and whether calls left the
    /// window to get there.
    pub(crate) fn totals_expiring(&self, now_ns: u64) -> (Totals, bool) {
        let (_, expired) = self.advance(now_ns);
        loop {
            let seq = self.seq.load(Acquire);
            if seq & 1 == 1 {
                // A rotation is under way: wait for it on its lock (it is short).
                drop(self.rotate.lock());
                continue;
            }
            // The head as of this read: the one `advance` returned may have been
            // folded into the totals since, and would be counted twice.
            let head = (self.head.load(Acquire) & 0xffff) as usize;
            let [hc, hf, hs] = self.buckets[head].load();
            let [c, f, s] = [&self.calls, &self.failures, &self.slow].map(|a| a.load(Relaxed));
            fence(Acquire);
            if self.seq.load(Relaxed) != seq {
                continue;
            }
            let calls = c.saturating_add(hc);
            let totals = Totals {
                calls,
                failures: f.saturating_add(hf).min(calls),
                slow: s.saturating_add(hs).min(calls),
            };
            return (totals, expired);
        }
    }

    /// Marks the totals as being written until the guard drops (call with the
    /// rotation lock held).
    fn write_section(&self) -> WriteSection<'_> {
        self.seq.fetch_add(1, Relaxed);
        fence(Release);
        WriteSection(&self.seq)
    }

    /// Forgets every outcome.
    pub(crate) fn reset(&self) {
        let mut folded = self.rotate.lock().unwrap_or_else(|e| e.into_inner());
        let _writing = self.write_section();
        for (b, counted) in self.buckets.iter().zip(folded.counted.iter_mut()) {
            b.clear();
            self.sub(std::mem::take(counted));
        }
    }
}

// === impl Window ===

/// The window a rate-based breaker evaluates.
#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    #[inline]
    /// Records one outcome; `true` if calls left a time window meanwhile (the window
    /// may be below the minimum again). `now_ns` is called only by a time window.
    pub(crate) fn record(&self, outcome: u8, now_ns: impl FnOnce() -> u64) -> bool {
        match self {
            Window::Count(w) => {
                w.record(outcome);
                false
            }
            Window::Time(w) => w.record(now_ns(), outcome),
        }
    }

    /// The current totals; `now_ns` is called only by a time window.
    pub(crate) fn totals(&self, now_ns: impl FnOnce() -> u64) -> Totals {
        self.totals_expiring(now_ns).0
    }

    /// The current totals, and whether calls left a time window to get there (as
    /// [`record`](Self::record) tells).
    pub(crate) fn totals_expiring(&self, now_ns: impl FnOnce() -> u64) -> (Totals, bool) {
        match self {
            Window::Count(w) => (w.totals(), false),
            Window::Time(w) => w.totals_expiring(now_ns()),
        }
    }

    /// Forgets every outcome.
    pub(crate) fn reset(&self) {
        match self {
            Window::Count(w) => w.reset(),
            Window::Time(w) => w.reset(),
        }
    }
}

#[cfg(test)]
mod tests {
    thread_local! {
        /// Run once by [`TimeWindow::advance`] between its two loads, on this thread.
        static BETWEEN_LOADS: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
            const { std::cell::RefCell::new(None) };
    }

    pub(super) fn between_loads() {
        if let Some(f) = BETWEEN_LOADS.with(|h| h.borrow_mut().take()) {
            f();
        }
    }

    /// A rotation that comes between a writer's reads of the head and its end does not
    /// put the writer's outcome, of the new bucket, into the old one it already
    /// folded: with two buckets, the next rotation expired the old one, and the
    /// failure was lost.
    #[test]
    fn an_outcome_racing_a_rotation_is_not_lost() {
        let w = std::sync::Arc::new(TimeWindow::new(2, 1_000));
        w.record(0, 0);
        let rotator = w.clone();
        BETWEEN_LOADS.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                rotator.totals(1_000);
            }));
        });
        w.record(1_500, FAILURE);
        assert_eq!(w.totals(1_600).failures, 1, "unseen by its own check");
        assert_eq!(w.totals(2_000).failures, 1, "lost at the next rotation");
    }

    use super::*;
    use proptest::prelude::*;

    fn t(calls: u64, failures: u64, slow: u64) -> Totals {
        Totals {
            calls,
            failures,
            slow,
        }
    }

    /// A reader never sees a failure without its call. One writer records a success
    /// then a failure, over and over, after one success: every state the window has
    /// holds fewer than half failures. Before, a read that loaded the calls just before
    /// a failure's call was counted and the failures just after saw exactly half (10 in
    /// 20 for 9 in 20, then 10 in 21), which trips a breaker at its 50 % threshold.
    /// (A race: it showed within a few thousand records.)
    fn a_read_never_sees_a_failure_before_its_call(
        record: &(dyn Fn(u8) + Sync),
        totals: &(dyn Fn() -> Totals + Sync),
    ) {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        const PAIRS: u64 = 400_000;
        record(0);
        let done = AtomicBool::new(false);
        let reading = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                // Not before the reader reads: else it could finish unobserved.
                while !reading.load(SeqCst) {
                    std::hint::spin_loop();
                }
                for _ in 0..PAIRS {
                    record(0);
                    record(FAILURE);
                }
                done.store(true, SeqCst);
            });
            let mut reads = 0u64;
            loop {
                let t = totals();
                assert!(
                    2 * t.failures < t.calls,
                    "a failure read without its call after {reads} reads: {t:?}"
                );
                reads += 1;
                reading.store(true, SeqCst);
                if done.load(SeqCst) {
                    break;
                }
            }
        });
    }

    #[test]
    fn a_count_window_read_never_sees_a_failure_before_its_call() {
        let w = CountWindow::new(1 << 21);
        a_read_never_sees_a_failure_before_its_call(&|o| w.record(o), &|| w.totals());
    }

    #[test]
    fn a_time_window_read_never_sees_a_failure_before_its_call() {
        let w = TimeWindow::new(1, u64::MAX / 2);
        a_read_never_sees_a_failure_before_its_call(
            &|o| {
                w.record(0, o);
            },
            &|| w.totals(0),
        );
    }

    /// A reader never sees a rotation half done: every bucket holds as many failures
    /// as successes, so a read made while nothing is being recorded shows exactly
    /// that. Before, a read between a rotation's update of the calls and of the
    /// failures saw a bucket's calls gone and its failures still there (a 50 % window
    /// read as 75 %), and could trip the breaker at its threshold. (A race: it showed
    /// within a few thousand rotations.)
    #[test]
    fn a_read_never_sees_a_rotation_half_done() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        // At least this many rotations, and on until the reader has checked this many
        // reads (it may start late on a busy machine), within a bound.
        const EPOCHS: u64 = 100_000;
        const CHECKS: u64 = 1_000;
        let w = TimeWindow::new(4, 1_000);
        // 2e while epoch e's rotation may be under way (nothing is recorded), 2e + 1
        // while its outcomes are recorded.
        let phase = AtomicU64::new(0);
        let checked = AtomicU64::new(0);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut epoch = 0;
                while epoch < EPOCHS || (checked.load(SeqCst) < CHECKS && epoch < 100 * EPOCHS) {
                    epoch += 1;
                    phase.store(2 * epoch, SeqCst);
                    w.totals(epoch * 1_000);
                    phase.store(2 * epoch + 1, SeqCst);
                    // The records below must not be seen before the phase (weakly
                    // ordered CPUs): a half-recorded bucket is no torn read.
                    fence(SeqCst);
                    for _ in 0..5 {
                        w.record(epoch * 1_000, 0);
                        w.record(epoch * 1_000, FAILURE);
                    }
                }
                done.store(true, SeqCst);
            });
            while !done.load(SeqCst) {
                let before = phase.load(SeqCst);
                // `now` 0 is behind the head: a read only, never a rotation.
                let t = w.totals(0);
                if before == phase.load(SeqCst) && before.is_multiple_of(2) {
                    assert_eq!(
                        t.failures * 2,
                        t.calls,
                        "a torn read after {} checked: {t:?}",
                        checked.load(SeqCst)
                    );
                    checked.fetch_add(1, SeqCst);
                }
            }
        });
        assert!(checked.into_inner() > 0, "no read fell between rotations");
    }

    #[test]
    fn count_window_of_size_one_holds_only_the_last_outcome() {
        let w = CountWindow::new(1);
        assert_eq!(w.totals(), t(0, 0, 0));
        w.record(FAILURE);
        assert_eq!(w.totals(), t(1, 1, 0));
        w.record(0);
        assert_eq!(w.totals(), t(1, 0, 0));
        w.record(SLOW | FAILURE);
        assert_eq!(w.totals(), t(1, 1, 1));
        w.record(SLOW);
        assert_eq!(w.totals(), t(1, 0, 1));
    }

    #[test]
    fn count_window_slides_after_n_successes() {
        let w = CountWindow::new(4);
        for _ in 0..4 {
            w.record(0);
        }
        w.record(FAILURE);
        w.record(FAILURE);
        assert_eq!(w.totals(), t(4, 2, 0));
        for _ in 0..2 {
            w.record(0);
        }
        assert_eq!(w.totals(), t(4, 2, 0));
        w.record(0);
        w.record(0);
        assert_eq!(w.totals(), t(4, 0, 0));
    }

    /// A writer that took its position before a reset and writes after the sweep passed
    /// its slot leaves a call with its failure, never a failure without its call (which
    /// made the next success look like a 100% failure rate).
    #[test]
    fn a_write_racing_a_reset_keeps_its_call_with_its_failure() {
        let w = CountWindow::new(4);
        for _ in 0..3 {
            w.record(0);
        }
        let pos = w.next.fetch_add(1, Relaxed); // the writer takes its place
        w.reset(); // a transition sweeps the window
        w.write(pos, FAILURE); // the write lands after the sweep
        let after = w.totals();
        assert!(after.failures <= after.calls, "{after:?}");
        w.record(0);
        assert_eq!(w.totals(), t(2, 1, 0));
    }

    #[test]
    fn count_window_reset_forgets_everything() {
        let w = CountWindow::new(3);
        w.record(FAILURE);
        w.record(SLOW);
        w.reset();
        assert_eq!(w.totals(), t(0, 0, 0));
        w.record(0);
        assert_eq!(w.totals(), t(1, 0, 0));
    }

    #[test]
    fn time_window_bucket_expires_exactly_at_t() {
        // 4 buckets of 10 ns: T = 40 ns.
        let w = TimeWindow::new(4, 10);
        w.record(0, FAILURE);
        assert_eq!(w.totals(39), t(1, 1, 0));
        assert_eq!(w.totals(40), t(0, 0, 0));
    }

    #[test]
    fn time_window_keeps_the_buckets_still_inside() {
        let w = TimeWindow::new(4, 10);
        w.record(5, FAILURE);
        w.record(15, 0);
        w.record(25, SLOW);
        w.record(35, 0);
        assert_eq!(w.totals(39), t(4, 1, 1));
        assert_eq!(w.totals(40), t(3, 0, 1));
        assert_eq!(w.totals(59), t(2, 0, 1));
        assert_eq!(w.totals(60), t(1, 0, 0));
        // Idle for longer than the whole window: everything expires at once.
        assert_eq!(w.totals(1_000), t(0, 0, 0));
        w.record(1_000, FAILURE);
        assert_eq!(w.totals(1_001), t(1, 1, 0));
    }

    #[test]
    fn time_window_of_one_bucket() {
        let w = TimeWindow::new(1, 100);
        w.record(0, FAILURE);
        w.record(99, 0);
        assert_eq!(w.totals(99), t(2, 1, 0));
        assert_eq!(w.totals(100), t(0, 0, 0));
    }

    #[test]
    fn late_outcome_counts_in_the_newest_bucket() {
        let w = TimeWindow::new(2, 10);
        w.record(25, 0);
        w.record(3, FAILURE); // read the clock long ago
        assert_eq!(w.totals(29), t(2, 1, 0));
        assert_eq!(w.totals(40), t(0, 0, 0));
    }

    #[test]
    fn time_window_loses_no_outcome_to_concurrent_rotations() {
        // 64 buckets of 10 ns: nothing recorded below expires before the last read.
        let w = std::sync::Arc::new(TimeWindow::new(64, 10));
        let clock = std::sync::Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (w, clock) = (w.clone(), clock.clone());
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        // Time moves through 40 buckets while the threads race.
                        let now = clock.fetch_add(1, Relaxed) / 200;
                        w.record(now, if i % 3 == 0 { FAILURE } else { 0 });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // One more rotation folds in any outcome written into a bucket it had left.
        let last = clock.load(Relaxed) / 200;
        let t = w.totals(last + 10);
        assert_eq!(t.calls, 80_000);
        assert_eq!(t.failures, 4 * 6_667);
    }

    #[test]
    fn time_window_reset_forgets_everything() {
        let w = TimeWindow::new(3, 10);
        w.record(1, FAILURE);
        w.record(11, SLOW);
        w.reset();
        assert_eq!(w.totals(12), t(0, 0, 0));
    }

    #[test]
    fn count_window_totals_are_exact_after_concurrent_writers() {
        let w = std::sync::Arc::new(CountWindow::new(7));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(t);
                    for _ in 0..20_000 {
                        w.record(rng.u8(0..4));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let slots: Vec<u8> = w.slots.iter().map(|s| s.load(Relaxed)).collect();
        let naive = t(
            7,
            slots.iter().filter(|&&o| o & FAILURE != 0).count() as u64,
            slots.iter().filter(|&&o| o & SLOW != 0).count() as u64,
        );
        assert_eq!(w.totals(), naive);
    }

    proptest! {
        #[test]
        fn count_window_rate_equals_naive_rate_over_last_n(
            size in 1u32..20,
            outcomes in proptest::collection::vec(0u8..4, 0..200),
        ) {
            let w = CountWindow::new(size);
            for (i, &o) in outcomes.iter().enumerate() {
                w.record(o);
                let start = (i + 1).saturating_sub(size as usize);
                let last = &outcomes[start..=i];
                let naive = t(
                    last.len() as u64,
                    last.iter().filter(|&&o| o & FAILURE != 0).count() as u64,
                    last.iter().filter(|&&o| o & SLOW != 0).count() as u64,
                );
                prop_assert_eq!(w.totals(), naive);
            }
        }

        #[test]
        fn time_window_equals_naive_count_over_buckets(
            buckets in 1u32..6,
            steps in proptest::collection::vec((0u64..25, 0u8..4), 0..100),
        ) {
            let width = 10;
            let w = TimeWindow::new(buckets, width);
            let mut now = 0;
            let mut seen: Vec<(u64, u8)> = Vec::new();
            for &(dt, o) in &steps {
                now += dt;
                w.record(now, o);
                seen.push((now, o));
                let start = (now / width + 1).saturating_sub(buckets as u64) * width;
                let inside: Vec<u8> = seen.iter().filter(|(at, _)| *at >= start).map(|(_, o)| *o).collect();
                let naive = t(
                    inside.len() as u64,
                    inside.iter().filter(|&&o| o & FAILURE != 0).count() as u64,
                    inside.iter().filter(|&&o| o & SLOW != 0).count() as u64,
                );
                prop_assert_eq!(w.totals(now), naive);
            }
        }
    }
}
