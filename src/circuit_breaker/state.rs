//! The breaker's state machine: a pure function of (state, event, `now`).
//!
//! Nothing here reads the clock on its own: every method takes a [`Now`], which either
//! holds a fixed instant (tests) or reads `tokio::time::Instant::now()` the first time
//! a method needs it (the tower shell). Which paths need it:
//!
//! | path | clock read |
//! |---|---|
//! | closed, count window, no slow-call tracking | none |
//! | closed, slow-call tracking | at admission and at completion |
//! | closed, time window | coarse clock at completion (precise if paused or fixed) |
//! | open | coarse clock at admission; precise in the last `SLACK_NS` of the break |
//! | half-open | with `max_wait_in_half_open` set: at a probe's admission, and when no probe is available |
//!
//! # Concurrency
//! The whole hot state is one `AtomicU64` word: mode, generation and, in half-open,
//! the probe slots and their results. Admitting a probe is one compare-and-swap on it,
//! so at most `permitted_probes` run at once (a slot given back admits another).
//! Transitions happen under a small mutex (only on transitions), are checked against the
//! generation a caller saw, and bump it: a late result from a call admitted before a
//! transition is dropped and can never fire a second transition.

use super::error::Open;
use super::window::{FAILURE, SLOW, Totals, Window};
use crate::clock::{self, Coarse, SLACK_NS};
use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

// === impl Now ===

/// The current time, read at most once and only if needed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    at: Option<Instant>,
    /// A fixed instant (tests): the coarse clock is never used.
    fixed: bool,
    /// Admission ahead of the call (`poll_ready`): a permit's slow-call clock starts
    /// at [`Breaker::start_call`], not now.
    defer_start: bool,
    #[cfg(test)]
    reads: u32,
}

impl Now {
    /// Reads `Instant::now()` the first time it is asked.
    #[inline]
    pub(crate) fn lazy() -> Self {
        Self {
            at: None,
            fixed: false,
            defer_start: false,
            #[cfg(test)]
            reads: 0,
        }
    }

    /// For an admission ahead of the call (`poll_ready`): the time the inner service
    /// then spends not ready (a bulkhead's queue) is not the call's, so a permit's
    /// slow-call clock starts at [`Breaker::start_call`].
    #[inline]
    pub(crate) fn deferring_start(mut self) -> Self {
        self.defer_start = true;
        self
    }

    /// A fixed instant (tests, or a caller that already read the clock).
    pub(crate) fn at(at: Instant) -> Self {
        Self {
            at: Some(at),
            fixed: true,
            defer_start: false,
            #[cfg(test)]
            reads: 0,
        }
    }

    #[inline]
    pub(crate) fn get(&mut self) -> Instant {
        #[cfg(test)]
        {
            self.reads += 1;
        }
        *self.at.get_or_insert_with(Instant::now)
    }
}

/// A rate threshold, in millionths: compared in integers, so an exact boundary counts
/// (55 of 100 calls reach 0.55; as floats, `55.0 >= 0.55 * 100.0` is false, the product
/// being 55.000000000000007) and the check costs a multiplication, not a division.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    ppm: u64,
}

impl Rate {
    /// `rate` (in `(0, 1]`, validated by the builder) to the nearest millionth, at
    /// least one: a rate of zero would be reached by successes alone.
    pub(crate) fn new(rate: f64) -> Self {
        Self {
            ppm: ((rate.clamp(0.0, 1.0) * 1e6).round() as u64).max(1),
        }
    }

    /// Whether `count` of `calls` reaches the rate.
    #[inline]
    fn reached(self, count: u64, calls: u64) -> bool {
        // In `u128`: saturated at `u64::MAX`, both sides would compare equal at any rate.
        u128::from(count) * 1_000_000 >= u128::from(self.ppm) * u128::from(calls)
    }
}

// === State ===

/// The state of a circuit breaker.
///
/// * `Closed` — calls flow; outcomes are recorded and the breaker trips (to `Open`)
///   when the failure or slow-call rate reaches its threshold.
/// * `Open` — every call is rejected at once with [`Open`]
///   until the break has elapsed; the next call then moves it to `HalfOpen`.
/// * `HalfOpen` — at most `permitted_probes` calls at once are let through (a probe
///   dropped or ignored gives its slot to another); their outcomes close the breaker
///   or open it again.
/// * `Disabled` — set by hand: every call flows, nothing is recorded.
/// * `ForcedOpen` — set by hand: every call is rejected until changed by hand.
/// * `MetricsOnly` — set by hand: every call flows and is recorded, but the breaker
///   never trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Calls flow and are recorded.
    Closed,
    /// Calls are rejected until the break elapses.
    Open,
    /// A limited number of probe calls decide whether to close.
    HalfOpen,
    /// Calls flow; nothing is recorded (manual).
    Disabled,
    /// Calls are rejected until changed by hand (manual).
    ForcedOpen,
    /// Calls flow and are recorded; the breaker never trips (manual).
    MetricsOnly,
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const DISABLED: u64 = 3;
const METRICS_ONLY: u64 = 4;
const FORCED_OPEN: u64 = 5;
/// The modes that admit every call as recorded (closed and metrics-only): exactly the
/// modes with these bits clear, so `acquire` tells them apart with one test.
const ADMIT_ALL_MASK: u64 = 0b011;
const _: () = assert!(
    CLOSED & ADMIT_ALL_MASK == 0
        && METRICS_ONLY & ADMIT_ALL_MASK == 0
        && OPEN & ADMIT_ALL_MASK != 0
        && HALF_OPEN & ADMIT_ALL_MASK != 0
        && DISABLED & ADMIT_ALL_MASK != 0
        && FORCED_OPEN & ADMIT_ALL_MASK != 0
);

impl State {
    fn from_mode(mode: u64) -> Self {
        match mode {
            CLOSED => State::Closed,
            OPEN => State::Open,
            HALF_OPEN => State::HalfOpen,
            DISABLED => State::Disabled,
            FORCED_OPEN => State::ForcedOpen,
            _ => State::MetricsOnly,
        }
    }

    /// The lowercase name (`"closed"`, `"open"`, `"half_open"`, …), as used in
    /// metrics labels.
    pub const fn as_str(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::Disabled => "disabled",
            State::ForcedOpen => "forced_open",
            State::MetricsOnly => "metrics_only",
        }
    }

    /// The value of the `postbox_circuit_state` gauge: 0 closed, 1 open, 2 half-open,
    /// 3 disabled, 4 forced open, 5 metrics only.
    pub const fn gauge_value(&self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::Open => 1.0,
            State::HalfOpen => 2.0,
            State::Disabled => 3.0,
            State::ForcedOpen => 4.0,
            State::MetricsOnly => 5.0,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === The state word ===
//
// bits 0..3 mode | 3..11 free probe slots | 11..19 probes done | 19..27 probes failed |
// 27..35 probes slow | 35..64 generation

const MODE_MASK: u64 = 0b111;
const FIELD: u64 = 0xff;
const AVAIL_SHIFT: u32 = 3;
const DONE_SHIFT: u32 = 11;
const FAIL_SHIFT: u32 = 19;
const SLOW_SHIFT: u32 = 27;
const GEN_SHIFT: u32 = 35;

/// Generations wrap at 2^29 (they are compared for equality only).
const GEN_MASK: u64 = (1 << (64 - GEN_SHIFT)) - 1;

/// The most probes a half-open breaker may admit (the counters are 8 bits).
pub(crate) const MAX_PROBES: u32 = 255;

#[inline]
const fn mode(w: u64) -> u64 {
    w & MODE_MASK
}
#[inline]
const fn generation(w: u64) -> u64 {
    w >> GEN_SHIFT
}
#[inline]
const fn field(w: u64, shift: u32) -> u64 {
    (w >> shift) & FIELD
}
const fn pack(generation: u64, mode: u64, avail: u64) -> u64 {
    (generation << GEN_SHIFT) | (avail << AVAIL_SHIFT) | mode
}

// === Transition and its hook ===

/// One change of state, given to the [`OnTransition`] hook.
#[derive(Debug, Clone)]
pub struct Transition {
    name: Cow<'static, str>,
    from: State,
    to: State,
    generation: u64,
}

impl Transition {
    /// The breaker's name (empty if unnamed). A per-key breaker's is its key, or
    /// `NAME/KEY` where the template is named `NAME`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The state left.
    pub const fn from(&self) -> State {
        self.from
    }

    /// The state entered.
    pub const fn to(&self) -> State {
        self.to
    }

    /// Counts transitions of this breaker: one more per transition (wrapping at
    /// 2^29), so hooks running on different threads can be ordered. A per-key
    /// breaker made again for a key (after its last was dropped from the map) counts
    /// on past every generation its map dropped, so a name's count never goes back.
    pub const fn generation(&self) -> u64 {
        self.generation
    }
}

/// Called on every state transition (tower-http's hook shape).
///
/// Implemented by `()` (does nothing) and by any `Fn(&Transition)`. Hooks run after the
/// transition is visible, outside the breaker's lock, on the thread that caused it;
/// keep them short. Every transition is also a `tracing` info event and a metric
/// whatever the hook.
pub trait OnTransition: Send + Sync + 'static {
    /// Called once per transition.
    fn on_transition(&self, transition: &Transition);
}

impl OnTransition for () {
    #[inline]
    fn on_transition(&self, _: &Transition) {}
}

impl<F> OnTransition for F
where
    F: Fn(&Transition) + Send + Sync + 'static,
{
    fn on_transition(&self, transition: &Transition) {
        self(transition)
    }
}

// === Metrics snapshot ===

/// A snapshot of a breaker's state and window, from
/// [`CircuitBreakerHandle::metrics`](super::CircuitBreakerHandle::metrics).
///
/// In half-open it shows the probes, as resilience4j does: `calls`, `failures` and
/// `slow_calls` count the probes done so far, and the rates stay `None` until the
/// number the decision waits for (min(`minimum_calls`, `permitted_probes`)) is done.
/// Closed, open and the manual states show the window (open: the one that tripped).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    state: State,
    calls: u64,
    failures: u64,
    slow_calls: u64,
    consecutive_failures: u64,
    minimum_calls: u64,
    not_permitted: u64,
}

impl Metrics {
    /// The state.
    pub const fn state(&self) -> State {
        self.state
    }

    /// Calls in the window (rate mode; 0 in consecutive-failures mode).
    pub const fn calls(&self) -> u64 {
        self.calls
    }

    /// Failed calls in the window (failures and overloads).
    pub const fn failures(&self) -> u64 {
        self.failures
    }

    /// Slow calls in the window.
    pub const fn slow_calls(&self) -> u64 {
        self.slow_calls
    }

    /// Failures in a row (consecutive-failures mode; 0 in rate mode).
    pub const fn consecutive_failures(&self) -> u64 {
        self.consecutive_failures
    }

    /// The failure rate in `[0, 1]`, or `None` while fewer than the minimum number of
    /// calls are in the window (resilience4j reports −1 there).
    pub fn failure_rate(&self) -> Option<f64> {
        (self.calls > 0 && self.calls >= self.minimum_calls)
            .then(|| self.failures as f64 / self.calls as f64)
    }

    /// The slow-call rate in `[0, 1]`, or `None` below the minimum number of calls.
    pub fn slow_call_rate(&self) -> Option<f64> {
        (self.calls > 0 && self.calls >= self.minimum_calls)
            .then(|| self.slow_calls as f64 / self.calls as f64)
    }

    /// Calls rejected since the breaker was built or [reset](super::CircuitBreakerHandle::reset).
    pub const fn not_permitted(&self) -> u64 {
        self.not_permitted
    }
}

// === Settings ===

/// How the breaker decides to trip.
#[derive(Debug)]
pub(crate) enum Trip {
    /// Failure rate or slow-call rate over a window.
    Rate {
        window: Window,
        /// Already capped at the size of a count window.
        minimum_calls: u64,
        slow_call_rate: Option<Rate>,
    },
    /// `n` failures in a row.
    Consecutive { n: u64, count: AtomicU64 },
}

/// Validated settings (see `config.rs`).
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) name: Cow<'static, str>,
    pub(crate) trip: Trip,
    pub(crate) failure_rate: Rate,
    pub(crate) slow_call_duration: Option<Duration>,
    pub(crate) break_duration: Duration,
    pub(crate) max_break_duration: Duration,
    pub(crate) break_multiplier: f64,
    pub(crate) jitter: f64,
    pub(crate) seed: Option<u64>,
    pub(crate) permitted_probes: u32,
    pub(crate) max_wait_in_half_open: Option<Duration>,
    pub(crate) count_calls: bool,
    pub(crate) count_dropped: bool,
}

// === Permit ===

const RECORDED: u64 = 0;
const PROBE: u64 = 1;
const UNTRACKED: u64 = 2;
const EMPTY: u64 = 3;
const REJECTED: u64 = 4;
const KIND_BITS: u32 = 3;
const KIND_MASK: u64 = (1 << KIND_BITS) - 1;
const NO_START: u64 = u64::MAX;
/// A tracked permit whose start is read when the call is made.
const START_AT_CALL: u64 = u64::MAX - 1;

/// Admission of one call, for the generation it was admitted in: two plain words, so
/// the service and the response future move it cheaply.
///
/// Also encodes "nothing reserved" and "rejected" so the service keeps its reservation
/// in the same two words.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Permit {
    /// `generation << 3 | kind`: kind is recorded (closed or metrics-only), probe
    /// (holds a half-open slot), untracked (disabled), empty, or rejected.
    tag: u64,
    /// When the call started, in ns since the breaker's origin (slow-call tracking);
    /// for a rejection, its `retry_after` in ns.
    start_ns: u64,
}

impl Permit {
    /// Nothing reserved (or used up).
    pub(crate) const EMPTY: Permit = Permit {
        tag: EMPTY,
        start_ns: NO_START,
    };

    #[inline]
    fn new(generation: u64, kind: u64, start_ns: u64) -> Self {
        Self {
            tag: (generation & GEN_MASK) << KIND_BITS | kind,
            start_ns,
        }
    }

    /// A rejection, kept until `call` (a forced one with the bit above the kind set).
    #[inline]
    pub(crate) fn rejected(open: &Open) -> Self {
        Self {
            tag: REJECTED | u64::from(open.is_forced()) << KIND_BITS,
            start_ns: open.as_nanos(),
        }
    }

    #[inline]
    fn kind(&self) -> u64 {
        self.tag & KIND_MASK
    }

    #[inline]
    fn generation(&self) -> u64 {
        self.tag >> KIND_BITS
    }

    /// Whether the outcome is recorded at all (disabled breakers skip classification).
    #[inline]
    pub(crate) fn is_tracked(&self) -> bool {
        matches!(self.kind(), RECORDED | PROBE)
    }

    /// Nothing reserved.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.kind() == EMPTY
    }

    /// The rejection this stands for, if it is one.
    #[inline]
    pub(crate) fn rejection(&self) -> Option<Open> {
        (self.kind() == REJECTED).then(|| {
            if self.tag >> KIND_BITS == 1 {
                Open::forced_from_nanos(self.start_ns)
            } else {
                Open::from_nanos(self.start_ns)
            }
        })
    }

    /// Whether this permit holds a half-open probe slot.
    #[cfg(test)]
    pub(crate) fn is_probe(&self) -> bool {
        self.kind() == PROBE
    }

    /// Returns the permit and leaves it empty (used up).
    #[inline]
    pub(crate) fn take(&mut self) -> Permit {
        std::mem::replace(self, Permit::EMPTY)
    }
}

/// The breaker's reading of a classified outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Success,
    Failure,
    Ignored,
}

// === impl Breaker ===

#[cold]
fn count_call(verdict: Verdict) {
    // One macro per outcome: literal labels make a static key. A label taken from a
    // variable builds the key at run time, a `Vec` allocation per call even with no
    // recorder installed (about 35 ns in `benches/telemetry.rs`).
    match verdict {
        Verdict::Success => metrics::counter!(
            "postbox_calls_total", "layer" => "circuit_breaker", "outcome" => "success"
        )
        .increment(1),
        Verdict::Failure => metrics::counter!(
            "postbox_calls_total", "layer" => "circuit_breaker", "outcome" => "failure"
        )
        .increment(1),
        Verdict::Ignored => metrics::counter!(
            "postbox_calls_total", "layer" => "circuit_breaker", "outcome" => "ignored"
        )
        .increment(1),
    }
}

#[derive(Debug)]
struct Cold {
    /// Openings since the breaker last closed (drives the growing break).
    openings: u32,
    rng: fastrand::Rng,
    /// Dropped from a keyed map: its gauge series now belongs to the key's next
    /// breaker, so a late transition (a probe still in flight) must not set it.
    retired: bool,
    /// Its gauge series exists (set at build, or at a transition).
    shown: bool,
}

/// The state word on a cache line of its own: the `Arc`'s reference count, which
/// every call increments, must not share it.
#[derive(Debug)]
#[repr(align(64))]
struct Word(AtomicU64);

impl std::ops::Deref for Word {
    type Target = AtomicU64;

    #[inline]
    fn deref(&self) -> &AtomicU64 {
        &self.0
    }
}

/// The breaker: the state word, the window and the transitions.
pub(crate) struct Breaker {
    word: Word,
    settings: Settings,
    origin: Instant,
    open_until_ns: AtomicU64,
    /// The raw coarse reading (see [`Coarse::raw_deadline`]) before which the current
    /// break is certainly not over; zero when there is no coarse clock.
    open_until_coarse: AtomicU64,
    half_open_until_ns: AtomicU64,
    not_permitted: AtomicU64,
    /// The next success is evaluated too (otherwise only failures and slow calls can
    /// raise a rate). Set while the window may hold fewer than `minimum_calls`, as a
    /// success may be the call that reaches the minimum with the failures before it;
    /// and by [`metrics`](Self::metrics) when reading a time window expired calls,
    /// which may have raised the rate with no outcome recorded to see them leave.
    /// Cleared by the evaluation once the window holds the minimum. A time window
    /// whose calls expire as an outcome is recorded evaluates that outcome anyway.
    below_minimum: AtomicBool,
    /// The coarse clock aligned with `origin`, decided at first use: `None` inside
    /// when tokio's clock is paused (tests) or the platform has none.
    coarse: OnceLock<Option<Coarse>>,
    cold: Mutex<Cold>,
    hook: Box<dyn OnTransition>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.settings.name)
            .field("state", &self.state())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    /// A closed breaker whose time starts at `origin`.
    pub(crate) fn new(settings: Settings, origin: Instant, hook: Box<dyn OnTransition>) -> Self {
        let rng = match settings.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        Self {
            word: Word(AtomicU64::new(pack(0, CLOSED, 0))),
            settings,
            origin,
            open_until_ns: AtomicU64::new(0),
            open_until_coarse: AtomicU64::new(0),
            half_open_until_ns: AtomicU64::new(u64::MAX),
            below_minimum: AtomicBool::new(true),
            not_permitted: AtomicU64::new(0),
            coarse: OnceLock::new(),
            cold: Mutex::new(Cold {
                openings: 0,
                rng,
                retired: false,
                shown: false,
            }),
            hook,
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.settings.name
    }

    #[inline]
    fn ns(&self, t: Instant) -> u64 {
        crate::duration::nanos(t.saturating_duration_since(self.origin))
    }

    /// The coarse clock, unless `now` is fixed, tokio's clock is paused or the platform
    /// has none.
    #[inline]
    fn coarse(&self, now: &mut Now) -> Option<Coarse> {
        if now.fixed {
            return None;
        }
        match self.coarse.get() {
            Some(c) => *c,
            None => self.detect_coarse(),
        }
    }

    #[cold]
    fn detect_coarse(&self) -> Option<Coarse> {
        // Aligned with fresh readings: the call's `now` may have been read a while ago.
        *self
            .coarse
            .get_or_init(|| Coarse::detect(|| self.ns(Instant::now())))
    }

    /// Now for the time window: the coarse clock when there is one (a bucket boundary
    /// may move by a tick), else the precise clock.
    #[inline]
    fn window_ns(&self, now: &mut Now) -> u64 {
        match self.coarse(now) {
            Some(c) => c.now_ns(),
            None => self.ns(now.get()),
        }
    }

    /// The current state.
    pub(crate) fn state(&self) -> State {
        State::from_mode(mode(self.word.load(Acquire)))
    }

    /// Whether the breaker still shields its dependency at `now`: open with the break
    /// not over, or half-open (probing).
    pub(crate) fn is_guarding(&self, now: Instant) -> bool {
        match mode(self.word.load(Acquire)) {
            OPEN => self.ns(now) < self.open_until_ns.load(Acquire),
            HALF_OPEN => true,
            _ => false,
        }
    }

    #[inline]
    fn start(&self, now: &mut Now) -> u64 {
        match self.settings.slow_call_duration {
            Some(_) if now.defer_start => START_AT_CALL,
            Some(_) => self.ns(now.get()),
            None => NO_START,
        }
    }

    /// Starts the slow-call clock of a permit admitted ahead of its call (see
    /// [`Now::deferring_start`]); one clock read, only with slow-call tracking.
    #[inline]
    pub(crate) fn start_call(&self, permit: &mut Permit) {
        if permit.start_ns == START_AT_CALL {
            permit.start_ns = self.ns(Instant::now());
        }
    }

    /// Counts a call rejected (made with a rejection from [`admit`](Self::admit)).
    #[inline]
    pub(crate) fn count_rejection(&self) {
        self.not_permitted.fetch_add(1, Relaxed);
        // Rejections are always counted; other outcomes only with `count_calls`.
        metrics::counter!("postbox_calls_total", "layer" => "circuit_breaker", "outcome" => "rejected")
            .increment(1);
    }

    /// [`admit`](Self::admit), counting a rejection: for a call being made now.
    #[inline]
    pub(crate) fn acquire(&self, now: &mut Now) -> Result<Permit, Open> {
        let admitted = self.admit(now);
        if admitted.is_err() {
            self.count_rejection();
        }
        admitted
    }

    /// Admits a call or rejects it.
    ///
    /// # Errors
    /// [`Open`] when the breaker is open, forced open, or half-open with every probe
    /// slot taken; it carries how long until a probe may be admitted. Not counted:
    /// a rejection is counted when the call it turns away is made
    /// ([`count_rejection`](Self::count_rejection)), so a `poll_ready` asked again
    /// does not count it twice.
    #[inline]
    pub(crate) fn admit(&self, now: &mut Now) -> Result<Permit, Open> {
        let w = self.word.load(Acquire);
        if w & ADMIT_ALL_MASK == 0 {
            return Ok(Permit::new(generation(w), RECORDED, self.start(now)));
        }
        if mode(w) == OPEN && !now.fixed {
            // While the break is certainly not over, one coarse reading decides
            // (about 5 ns instead of 25); its last `SLACK_NS`, the precise clock.
            let raw = clock::raw_now();
            let until = self.open_until_coarse.load(Relaxed);
            if raw < until {
                return Err(Open::from_nanos((until - raw).saturating_add(SLACK_NS)));
            }
        }
        self.acquire_slow(now)
    }

    fn acquire_slow(&self, now: &mut Now) -> Result<Permit, Open> {
        loop {
            let w = self.word.load(Acquire);
            let generation = generation(w);
            match mode(w) {
                CLOSED | METRICS_ONLY => {
                    return Ok(Permit::new(generation, RECORDED, self.start(now)));
                }
                DISABLED => {
                    return Ok(Permit::new(generation, UNTRACKED, NO_START));
                }
                OPEN => {
                    let until = self.open_until_ns.load(Acquire);
                    let t = self.ns(now.get());
                    if t < until {
                        return Err(Open::from_nanos(until - t));
                    }
                    self.transition(w, HALF_OPEN, now, false);
                }
                HALF_OPEN => {
                    if field(w, AVAIL_SHIFT) > 0 {
                        if let Some(d) = self.settings.max_wait_in_half_open {
                            // Every probe gets the whole wait from its admission: a
                            // probe let in late (low traffic, or a slot given back) is
                            // not cut off by an earlier one's limit. Pushed before the
                            // slot is taken: a caller that finds no slot left (it reads
                            // the word our exchange wrote) sees this wait too, and does
                            // not reopen the breaker on the earlier one's. (If the
                            // exchange fails, the wait only grew a little.)
                            let until =
                                self.ns(now.get()).saturating_add(crate::duration::nanos(d));
                            self.half_open_until_ns.fetch_max(until, AcqRel);
                        }
                        let taken = w - (1 << AVAIL_SHIFT);
                        if self
                            .word
                            .compare_exchange(w, taken, AcqRel, Acquire)
                            .is_ok()
                        {
                            return Ok(Permit::new(generation, PROBE, self.start(now)));
                        }
                        continue;
                    }
                    if self.settings.max_wait_in_half_open.is_some()
                        && self.ns(now.get()) >= self.half_open_until_ns.load(Acquire)
                    {
                        // Stuck: the probes never came back in time.
                        self.transition(w, OPEN, now, false);
                        continue;
                    }
                    return Err(Open::from_nanos(0));
                }
                _ => {
                    return Err(Open::forced_from_nanos(crate::duration::nanos(
                        self.settings.break_duration,
                    )));
                }
            }
        }
    }

    /// Whether `permit` was admitted in the breaker's current generation: no transition
    /// (a trip, a manual change) happened since.
    #[inline]
    pub(crate) fn is_current(&self, permit: &Permit) -> bool {
        generation(self.word.load(Acquire)) == permit.generation()
    }

    /// Ends an admitted call whose future was dropped unfinished (a no-op for one
    /// already recorded): a failure with `count_dropped`, else a probe slot given back.
    #[inline]
    pub(crate) fn drop_unfinished(&self, permit: Permit) {
        if permit.is_tracked() && self.settings.count_dropped {
            self.complete(permit, Verdict::Failure, &mut Now::lazy());
        } else {
            self.release(permit);
        }
    }

    /// Gives a probe slot back without a result (the call was dropped, panicked, or
    /// its outcome was ignored).
    #[inline]
    pub(crate) fn release(&self, permit: Permit) {
        if permit.kind() == PROBE {
            self.release_probe(permit);
        }
    }

    fn release_probe(&self, permit: Permit) {
        let mut w = self.word.load(Acquire);
        loop {
            if generation(w) != permit.generation() || mode(w) != HALF_OPEN {
                return;
            }
            match self
                .word
                .compare_exchange_weak(w, w + (1 << AVAIL_SHIFT), AcqRel, Acquire)
            {
                Ok(_) => return,
                Err(cur) => w = cur,
            }
        }
    }

    /// Records the outcome of an admitted call.
    #[inline]
    pub(crate) fn complete(&self, permit: Permit, verdict: Verdict, now: &mut Now) {
        if self.settings.count_calls {
            count_call(verdict);
        }
        match permit.kind() {
            PROBE => self.complete_probe(permit, verdict, now),
            RECORDED => {
                if verdict == Verdict::Ignored {
                    return;
                }
                let w = self.word.load(Acquire);
                if generation(w) != permit.generation() {
                    // Admitted before a transition: its outcome belongs to a window
                    // that is gone. (One that passed this check just before a manual
                    // reset can still land in the new window: a few outcomes at most.)
                    return;
                }
                let outcome = self.outcome(permit, verdict, now);
                match &self.settings.trip {
                    Trip::Rate { window, .. } => {
                        let expired = window.record(outcome, || self.window_ns(now));
                        if outcome != 0 || expired || self.below_minimum.load(Relaxed) {
                            self.evaluate(w, now);
                        }
                    }
                    Trip::Consecutive { n, count } => {
                        if outcome & FAILURE != 0 {
                            let c = count.fetch_add(1, Relaxed) + 1;
                            if c >= *n && mode(w) == CLOSED {
                                self.transition(w, OPEN, now, false);
                            }
                        } else if count.load(Relaxed) != 0 {
                            count.store(0, Relaxed);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    #[inline]
    fn outcome(&self, permit: Permit, verdict: Verdict, now: &mut Now) -> u8 {
        let mut outcome = 0;
        if verdict == Verdict::Failure {
            outcome |= FAILURE;
        }
        if let Some(slow) = self.settings.slow_call_duration
            && permit.start_ns != NO_START
            && self.ns(now.get()).saturating_sub(permit.start_ns) > crate::duration::nanos(slow)
        {
            outcome |= SLOW;
        }
        outcome
    }

    /// Trips a closed breaker whose window crossed a threshold.
    fn evaluate(&self, w: u64, now: &mut Now) {
        let Trip::Rate {
            window,
            minimum_calls,
            slow_call_rate,
        } = &self.settings.trip
        else {
            return;
        };
        let t = window.totals(|| self.window_ns(now));
        self.judge(w, t, *minimum_calls, *slow_call_rate, now);
    }

    /// [`evaluate`](Self::evaluate) on totals read from the window while the word was `w`.
    fn judge(
        &self,
        w: u64,
        t: Totals,
        minimum_calls: u64,
        slow_call_rate: Option<Rate>,
        now: &mut Now,
    ) {
        let below = t.calls == 0 || t.calls < minimum_calls;
        if self.below_minimum.load(Relaxed) != below {
            // A swap, so that reading the `true` of a transition's second sweep
            // (stored with `Release`) makes its new generation visible just below.
            self.below_minimum.swap(below, AcqRel);
            if !below && generation(self.word.load(Acquire)) != generation(w) {
                // A transition cleared the window after these totals were read (this
                // thread was preempted): its "below the minimum" stands, else the
                // successes of the new window would go unevaluated. (A success of the
                // new window recorded between the swap and this store skips its
                // evaluation; the next outcome makes it.)
                self.below_minimum.store(true, Release);
                return;
            }
        }
        if below {
            return;
        }
        let trip = self.settings.failure_rate.reached(t.failures, t.calls)
            || slow_call_rate.is_some_and(|r| r.reached(t.slow, t.calls));
        // Metrics-only breakers evaluate too (same cost) but never trip.
        if trip && mode(w) == CLOSED {
            self.transition(w, OPEN, now, false);
        }
    }

    fn complete_probe(&self, permit: Permit, verdict: Verdict, now: &mut Now) {
        if verdict == Verdict::Ignored {
            self.release(permit);
            return;
        }
        let outcome = self.outcome(permit, verdict, now);
        let mut add = 1 << DONE_SHIFT;
        if outcome & FAILURE != 0 {
            add += 1 << FAIL_SHIFT;
        }
        if outcome & SLOW != 0 {
            add += 1 << SLOW_SHIFT;
        }
        // Judged once min(`minimum_calls`, probes) probes are done, as resilience4j
        // does: a rate over fewer calls than the closed window would judge is not
        // waited on (a hung last probe would hold every caller off until
        // `max_wait_in_half_open`); probes still out then belong to the old state.
        let needed = self.probes_needed();
        let mut w = self.word.load(Acquire);
        let new = loop {
            // Also once the deciding probe is in, before its transition: a later one
            // would judge a count past it, and decide instead if it took the lock first.
            if generation(w) != permit.generation()
                || mode(w) != HALF_OPEN
                || field(w, DONE_SHIFT) >= needed
            {
                return;
            }
            match self.word.compare_exchange_weak(w, w + add, AcqRel, Acquire) {
                Ok(_) => break w + add,
                Err(cur) => w = cur,
            }
        };
        let done = field(new, DONE_SHIFT);
        if done < needed {
            return;
        }
        let failed = self
            .settings
            .failure_rate
            .reached(field(new, FAIL_SHIFT), done);
        let slow = match &self.settings.trip {
            Trip::Rate {
                slow_call_rate: Some(r),
                ..
            } => r.reached(field(new, SLOW_SHIFT), done),
            _ => false,
        };
        let to = if failed || slow { OPEN } else { CLOSED };
        self.transition(new, to, now, false);
    }

    /// Moves from the state in `expected` (same generation and mode) to `to`. Returns
    /// `false` if someone else moved first.
    fn transition(&self, expected: u64, to: u64, now: &mut Now, reset: bool) -> bool {
        let mut cold = self.cold.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.word.load(Acquire);
        if generation(cur) != generation(expected) || mode(cur) != mode(expected) {
            return false;
        }
        let mut avail = 0;
        match to {
            OPEN => {
                cold.openings = cold.openings.saturating_add(1);
                let d = self.break_for(&mut cold);
                let until = self.ns(now.get()).saturating_add(crate::duration::nanos(d));
                self.open_until_ns.store(until, Release);
                let coarse = self.coarse(now).map_or(0, |c| c.raw_deadline(until));
                self.open_until_coarse.store(coarse, Relaxed);
            }
            HALF_OPEN => {
                avail = u64::from(self.settings.permitted_probes);
                let until = match self.settings.max_wait_in_half_open {
                    Some(d) => self.ns(now.get()).saturating_add(crate::duration::nanos(d)),
                    None => u64::MAX,
                };
                self.half_open_until_ns.store(until, Release);
            }
            CLOSED => cold.openings = 0,
            _ => {}
        }
        if reset {
            cold.openings = 0;
            self.not_permitted.store(0, Relaxed);
        }
        let generation = (generation(cur) + 1) & GEN_MASK;
        let clear = reset || matches!(to, CLOSED | METRICS_ONLY);
        // Cleared before the new generation is published (its first calls must not
        // judge the old window: the failures that opened the breaker would open it
        // again), and again after: an outcome of the old generation that checked the
        // word before the store and was recorded during the first sweep is swept by
        // the second. Outcomes of the new generation recorded in between may be swept
        // too: a few calls uncounted. An old outcome whose recording stalled past the
        // second sweep (preempted between its check and its record) still lands in the
        // new window; automatic transitions cannot meet it (half-open admits no
        // recorded calls), a manual reset under load can, for a few outcomes.
        if clear {
            self.clear_window();
        }
        self.word.store(pack(generation, to, avail), Release);
        if clear {
            self.clear_window();
        }
        // Under the lock: two transitions on two threads set the gauge in their order.
        let retired = cold.retired;
        if !retired {
            cold.shown = true;
            self.set_gauge(to);
        }
        drop(cold);
        if !retired {
            self.emit(mode(cur), to, generation);
        }
        true
    }

    /// Sets the `postbox_circuit_state` gauge to `mode`.
    fn set_gauge(&self, mode: u64) {
        metrics::gauge!("postbox_circuit_state", "breaker" => self.settings.name.clone())
            .set(State::from_mode(mode).gauge_value());
    }

    /// Sets the gauge to closed: for a new breaker, so a healthy one shows up too.
    pub(crate) fn show_closed(&self) {
        let mut cold = self.cold.lock().unwrap_or_else(|e| e.into_inner());
        cold.shown = true;
        self.set_gauge(CLOSED);
    }

    /// The generation of the current state.
    pub(crate) fn current_generation(&self) -> u64 {
        generation(self.word.load(Acquire))
    }

    /// Starts a breaker not yet shared at generation `g`: a key's breaker made again
    /// after its last was dropped counts on from there, so a hook ordering a name's
    /// transitions by generation does not take the new breaker's for stale ones.
    pub(crate) fn start_at_generation(&self, g: u64) {
        self.word.store(pack(g & GEN_MASK, CLOSED, 0), Relaxed);
    }

    /// For a breaker dropped from a keyed map: sets the gauge to closed (its key
    /// starts closed again; the series must not go on showing it open), and keeps
    /// later transitions of this breaker (a call still in flight) off the gauge, the
    /// transition counter and the hooks: the key's next breaker is the one they show.
    pub(crate) fn retire(&self) {
        let mut cold = self.cold.lock().unwrap_or_else(|e| e.into_inner());
        cold.retired = true;
        // Only a series that exists goes back to closed: a key that never left closed
        // gets none (one per key ever seen would grow without bound).
        if cold.shown {
            self.set_gauge(CLOSED);
        }
    }

    fn clear_window(&self) {
        // `Release`: see `judge`.
        self.below_minimum.store(true, Release);
        match &self.settings.trip {
            Trip::Rate { window, .. } => window.reset(),
            Trip::Consecutive { count, .. } => count.store(0, Relaxed),
        }
    }

    /// The break for the current opening: `break_duration × multiplier^(openings−1)`,
    /// capped, then shortened by up to `jitter` of itself.
    fn break_for(&self, cold: &mut Cold) -> Duration {
        let s = &self.settings;
        let base = s.break_duration.as_secs_f64();
        let exp = i32::try_from(cold.openings.saturating_sub(1)).unwrap_or(i32::MAX);
        let grown = base * s.break_multiplier.powi(exp);
        let capped = grown.min(s.max_break_duration.as_secs_f64());
        let jittered = if s.jitter > 0.0 {
            capped * (1.0 - s.jitter * cold.rng.f64())
        } else {
            capped
        };
        Duration::try_from_secs_f64(jittered)
            .unwrap_or(s.max_break_duration)
            .max(Duration::from_nanos(1))
    }

    fn emit(&self, from: u64, to: u64, generation: u64) {
        let (from, to) = (State::from_mode(from), State::from_mode(to));
        tracing::info!(
            breaker = %self.settings.name,
            from = from.as_str(),
            to = to.as_str(),
            generation,
            "circuit breaker state changed"
        );
        metrics::counter!(
            "postbox_circuit_transitions_total",
            "breaker" => self.settings.name.clone(),
            "from" => from.as_str(),
            "to" => to.as_str()
        )
        .increment(1);
        self.hook.on_transition(&Transition {
            name: self.settings.name.clone(),
            from,
            to,
            generation,
        });
    }

    /// Moves to `to` by hand, whatever the current state (`reset` also forgets the
    /// openings and the rejected-call count).
    pub(crate) fn force(&self, to: State, reset: bool, now: &mut Now) {
        let to = match to {
            State::Closed => CLOSED,
            State::Open => OPEN,
            State::HalfOpen => HALF_OPEN,
            State::Disabled => DISABLED,
            State::ForcedOpen => FORCED_OPEN,
            State::MetricsOnly => METRICS_ONLY,
        };
        // Retry until no one else transitions in between.
        while !self.transition(self.word.load(Acquire), to, now, reset) {}
    }

    /// A snapshot of the state and window at `now`.
    /// How many half-open probes are judged: min(`minimum_calls`, probes) in rate mode.
    fn probes_needed(&self) -> u64 {
        let probes = u64::from(self.settings.permitted_probes);
        match &self.settings.trip {
            Trip::Rate { minimum_calls, .. } => probes.min((*minimum_calls).max(1)),
            Trip::Consecutive { .. } => probes,
        }
    }

    pub(crate) fn metrics(&self, now: &mut Now) -> Metrics {
        let w = self.word.load(Acquire);
        if mode(w) == HALF_OPEN {
            return Metrics {
                state: State::HalfOpen,
                calls: field(w, DONE_SHIFT),
                failures: field(w, FAIL_SHIFT),
                slow_calls: field(w, SLOW_SHIFT),
                consecutive_failures: 0,
                minimum_calls: self.probes_needed(),
                not_permitted: self.not_permitted.load(Relaxed),
            };
        }
        let state = self.state();
        let (t, consecutive, minimum_calls) = match &self.settings.trip {
            Trip::Rate {
                window,
                minimum_calls,
                ..
            } => {
                let (t, expired) = window.totals_expiring(|| self.window_ns(now));
                // Reading the totals may have moved calls out of a time window, and
                // the outcome recorded next will not see them leave: it is evaluated
                // (the rate may have risen past the threshold, or fallen below the
                // minimum).
                if expired && !self.below_minimum.load(Relaxed) {
                    // A read-modify-write, not a store: it keeps the release sequence of
                    // a transition's sweep intact for `judge`'s swap.
                    self.below_minimum.swap(true, Relaxed);
                }
                (t, 0, *minimum_calls)
            }
            Trip::Consecutive { count, .. } => (Totals::default(), count.load(Relaxed), 1),
        };
        Metrics {
            state,
            calls: t.calls,
            failures: t.failures,
            slow_calls: t.slow,
            consecutive_failures: consecutive,
            minimum_calls,
            not_permitted: self.not_permitted.load(Relaxed),
        }
    }

    /// When the current break ends (`None` unless open).
    pub(crate) fn retry_after(&self, now: &mut Now) -> Option<Duration> {
        (self.state() == State::Open).then(|| {
            Duration::from_nanos(
                self.open_until_ns
                    .load(Acquire)
                    .saturating_sub(self.ns(now.get())),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circuit_breaker::window::{CountWindow, TimeWindow};
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    fn settings(trip: Trip) -> Settings {
        Settings {
            name: Cow::Borrowed("test"),
            trip,
            failure_rate: Rate::new(0.5),
            slow_call_duration: None,
            break_duration: Duration::from_secs(10),
            max_break_duration: Duration::from_secs(10),
            break_multiplier: 1.0,
            jitter: 0.0,
            seed: Some(7),
            permitted_probes: 2,
            max_wait_in_half_open: None,
            count_calls: false,
            count_dropped: false,
        }
    }

    fn count(size: u32, minimum_calls: u64) -> Trip {
        Trip::Rate {
            window: Window::Count(CountWindow::new(size)),
            minimum_calls: minimum_calls.min(u64::from(size)),
            slow_call_rate: None,
        }
    }

    fn breaker(s: Settings, t0: Instant) -> Breaker {
        Breaker::new(s, t0, Box::new(()))
    }

    fn call(b: &Breaker, at: Instant, verdict: Verdict) -> Result<(), Open> {
        let mut now = Now::at(at);
        let p = b.acquire(&mut now)?;
        b.complete(p, verdict, &mut now);
        Ok(())
    }

    /// Nine failures then a success reach `minimum_calls` at 90 %: the success is
    /// evaluated too (only failures were, so the breaker stayed closed and the
    /// failures slid out unseen).
    #[test]
    fn trips_when_minimum_calls_is_reached_by_a_success() {
        let t0 = Instant::now();
        let b = breaker(settings(count(10, 10)), t0);
        for _ in 0..9 {
            call(&b, t0, Verdict::Failure).unwrap();
        }
        assert_eq!(b.state(), State::Closed);
        call(&b, t0, Verdict::Success).unwrap();
        assert_eq!(b.state(), State::Open);
    }

    /// An evaluation that read a full window, then was preempted while a manual reset
    /// cleared it, does not mark the new window as past the minimum: nine failures
    /// and a success in the new window still trip the breaker.
    #[test]
    fn a_stale_evaluation_does_not_hide_the_minimum_from_the_next_generation() {
        let t0 = Instant::now();
        let b = breaker(settings(count(10, 10)), t0);
        for _ in 0..10 {
            call(&b, t0, Verdict::Success).unwrap();
        }
        let old_w = b.word.load(Acquire);
        let Trip::Rate { window, .. } = &b.settings.trip else {
            unreachable!()
        };
        let full = window.totals(|| 0);
        assert_eq!(full.calls, 10);

        b.force(State::Closed, true, &mut Now::at(t0));
        for _ in 0..9 {
            call(&b, t0, Verdict::Failure).unwrap();
        }
        // The preempted evaluation of the old window finishes now.
        b.judge(old_w, full, 10, None, &mut Now::at(t0));
        assert_eq!(b.state(), State::Closed);
        call(&b, t0, Verdict::Success).unwrap();
        assert_eq!(b.state(), State::Open);
    }

    /// A probe that completes once the deciding probe is in, before that one's
    /// transition took the lock, is dropped: it neither counts nor decides. (Its result
    /// was added, and if it took the lock first it decided on a count past the
    /// decision: two successes after a failure closed a breaker the first two probes,
    /// at 50 %, had reopened.)
    #[test]
    fn a_probe_after_the_deciding_one_does_not_decide() {
        let t0 = Instant::now();
        let mut s = settings(count(4, 2));
        s.permitted_probes = 3;
        let b = Arc::new(breaker(s, t0));
        call(&b, t0, Verdict::Failure).unwrap();
        call(&b, t0, Verdict::Failure).unwrap();
        assert_eq!(b.state(), State::Open);
        let after = t0 + Duration::from_secs(10);
        let mut now = Now::at(after);
        let probes: Vec<_> = (0..3).map(|_| b.acquire(&mut now).unwrap()).collect();
        let [p1, p2, p3] = <[_; 3]>::try_from(probes).ok().unwrap();
        b.complete(p1, Verdict::Failure, &mut Now::at(after));
        // The deciding probe is in, its transition waiting for the lock.
        let held = b.cold.lock().unwrap();
        let deciding = {
            let b = b.clone();
            std::thread::spawn(move || b.complete(p2, Verdict::Success, &mut Now::at(after)))
        };
        while field(b.word.load(Acquire), DONE_SHIFT) < 2 {
            std::thread::yield_now();
        }
        let late = {
            let b = b.clone();
            std::thread::spawn(move || b.complete(p3, Verdict::Success, &mut Now::at(after)))
        };
        // Bounded (a late probe that waits for the lock never finishes here).
        for _ in 0..1_000_000 {
            if late.is_finished() {
                break;
            }
            std::thread::yield_now();
        }
        let done = field(b.word.load(Acquire), DONE_SHIFT);
        let late_finished = late.is_finished();
        drop(held);
        deciding.join().unwrap();
        late.join().unwrap();
        assert!(late_finished, "the late probe waited to decide");
        assert_eq!(done, 2, "the late probe was counted");
        assert_eq!(b.state(), State::Open);
    }

    /// An exact boundary trips: 55 failures of 100 calls at a 0.55 rate (compared as
    /// `55 >= 0.55 * 100.0` it did not, the product being 55.000000000000007).
    #[test]
    fn an_exact_failure_rate_boundary_trips() {
        let t0 = Instant::now();
        let mut s = settings(count(100, 100));
        s.failure_rate = Rate::new(0.55);
        let b = breaker(s, t0);
        for _ in 0..45 {
            call(&b, t0, Verdict::Success).unwrap();
        }
        for _ in 0..55 {
            call(&b, t0, Verdict::Failure).unwrap();
        }
        assert_eq!(b.state(), State::Open);
    }

    /// A rate below a millionth is one millionth, not zero: successes alone never
    /// reach it.
    #[test]
    fn a_tiny_rate_threshold_does_not_trip_on_successes() {
        let t0 = Instant::now();
        let mut s = settings(count(10, 10));
        s.failure_rate = Rate::new(1e-9);
        let b = breaker(s, t0);
        for _ in 0..10 {
            call(&b, t0, Verdict::Success).unwrap();
        }
        assert_eq!(b.state(), State::Closed);
        call(&b, t0, Verdict::Failure).unwrap();
        assert_eq!(b.state(), State::Open);
    }

    /// A rate is compared exactly at any count: saturated at `u64::MAX`, 20 % of
    /// 10^14 calls read as reaching 90 %.
    #[test]
    fn a_rate_is_compared_without_saturating() {
        assert!(!Rate::new(0.9).reached(20_000_000_000_000, 100_000_000_000_000));
        assert!(Rate::new(0.2).reached(20_000_000_000_000, 100_000_000_000_000));
    }

    /// A slow-call threshold past 2^64 ns saturates instead of wrapping to a fraction
    /// of a second (which made every call of more than 0.29 s slow).
    #[test]
    fn huge_durations_saturate_not_wrap() {
        let t0 = Instant::now();
        let mut s = settings(Trip::Rate {
            window: Window::Count(CountWindow::new(1)),
            minimum_calls: 1,
            slow_call_rate: Some(Rate::new(0.5)),
        });
        s.slow_call_duration = Some(Duration::from_secs(18_446_744_074));
        let b = breaker(s, t0);
        let p = b.acquire(&mut Now::at(t0)).unwrap();
        b.complete(
            p,
            Verdict::Success,
            &mut Now::at(t0 + Duration::from_secs(1)),
        );
        assert_eq!(b.state(), State::Closed);
    }

    /// The atomic core under real thread interleavings (no runtime): OS threads released
    /// together at the instant the break is over race the open → half-open transition
    /// and the probe slots; exactly `permitted_probes` are admitted, every round.
    #[test]
    fn threads_racing_the_end_of_a_break_admit_exactly_the_permitted_probes() {
        const THREADS: usize = 4;
        const CALLS: usize = 64;
        for round in 0..200 {
            let t0 = Instant::now();
            let b = breaker(settings(count(10, 10)), t0);
            b.force(State::Open, false, &mut Now::at(t0));
            let over = t0 + Duration::from_secs(10);
            let barrier = std::sync::Barrier::new(THREADS);
            let admitted: usize = std::thread::scope(|s| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            (0..CALLS)
                                .filter(|_| {
                                    b.acquire(&mut Now::at(over)).is_ok_and(|p| p.is_probe())
                                })
                                .count()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(admitted, 2, "round {round}");
            assert_eq!(b.state(), State::HalfOpen);
            let m = b.metrics(&mut Now::at(over));
            assert_eq!(
                m.not_permitted() as usize,
                THREADS * CALLS - 2,
                "round {round}"
            );
        }
    }

    /// A breaker forced open now, on the real clock, for `break_duration`.
    fn forced_open_in_real_time(break_duration: Duration) -> (Breaker, Instant) {
        let mut s = settings(count(10, 10));
        s.break_duration = break_duration;
        s.max_break_duration = break_duration;
        let t0 = Instant::now();
        let b = breaker(s, t0);
        b.force(State::Open, false, &mut Now::lazy());
        (b, t0)
    }

    /// Real time, not paused: the open check runs on the coarse clock here.
    #[tokio::test]
    async fn coarse_open_check_never_admits_a_probe_before_the_break_is_over() {
        // Long enough that the first try comes before it is over, however slow the box.
        let (b, t0) = forced_open_in_real_time(Duration::from_millis(300));
        let mut rejected = 0u64;
        // A box that stalls this thread past the break before the first try admits it
        // rightly: then no rejection is expected.
        let first_try = t0.elapsed();
        while b.acquire(&mut Now::lazy()).is_err() {
            rejected += 1;
            tokio::task::yield_now().await;
        }
        assert!(t0.elapsed() >= Duration::from_millis(300), "admitted early");
        assert!(b.coarse.get().is_some(), "the clock was chosen");
        assert!(
            rejected > 0 || first_try >= Duration::from_millis(300),
            "a try within the break was admitted"
        );
        assert_eq!(b.state(), State::HalfOpen);
    }

    /// Real time: while the break is far from over, a rejection reads only the coarse
    /// clock, and the time it reports is the break's remainder within a tick.
    #[tokio::test]
    async fn open_breaker_rejects_on_the_coarse_clock_alone_with_the_remaining_break() {
        let (b, t0) = forced_open_in_real_time(Duration::from_secs(10));
        let mut now = Now::lazy();
        // The break's remainder before and after the rejection: a pause of the thread
        // between the two (a loaded box) widens the bounds, it does not fail the test.
        let before = Duration::from_secs(10).saturating_sub(t0.elapsed());
        let open = b.acquire(&mut now).expect_err("open");
        let after = Duration::from_secs(10).saturating_sub(t0.elapsed());
        assert_eq!(now.reads, 0, "the precise clock was read");
        let slack = Duration::from_nanos(SLACK_NS);
        assert!(
            open.retry_after() <= before + slack && open.retry_after() + slack >= after,
            "retry_after {:?}, break left {after:?} to {before:?}",
            open.retry_after()
        );
        assert_eq!(b.metrics(&mut Now::lazy()).not_permitted(), 1);
    }

    #[test]
    fn opens_after_n_successes_then_n_half_failures() {
        let t0 = Instant::now();
        let b = breaker(settings(count(10, 10)), t0);
        for _ in 0..10 {
            call(&b, t0, Verdict::Success).unwrap();
        }
        for _ in 0..4 {
            call(&b, t0, Verdict::Failure).unwrap();
        }
        assert_eq!(b.state(), State::Closed);
        call(&b, t0, Verdict::Failure).unwrap();
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn closed_count_window_never_reads_the_clock() {
        let b = breaker(settings(count(10, 10)), Instant::now());
        let mut now = Now::lazy();
        for v in [Verdict::Success, Verdict::Failure, Verdict::Ignored] {
            let p = b.acquire(&mut now).unwrap();
            b.complete(p, v, &mut now);
        }
        assert_eq!(now.reads, 0);
    }

    #[test]
    fn open_rejects_with_time_left_then_half_opens() {
        let t0 = Instant::now();
        let b = breaker(settings(count(1, 1)), t0);
        call(&b, t0, Verdict::Failure).unwrap();
        assert_eq!(b.state(), State::Open);
        let e = call(&b, t0 + Duration::from_secs(4), Verdict::Success).unwrap_err();
        assert_eq!(e.retry_after(), Duration::from_secs(6));
        let mut now = Now::at(t0 + Duration::from_secs(10));
        let p = b.acquire(&mut now).unwrap();
        assert!(p.is_probe());
        assert_eq!(b.state(), State::HalfOpen);
    }

    #[test]
    fn half_open_admits_configured_probes_and_reopens_when_half_fail() {
        let t0 = Instant::now();
        // `minimum_calls` 2: both probes are waited for.
        let b = breaker(settings(count(2, 2)), t0);
        call(&b, t0, Verdict::Failure).unwrap();
        call(&b, t0, Verdict::Failure).unwrap();
        let mut now = Now::at(t0 + Duration::from_secs(10));
        let p1 = b.acquire(&mut now).unwrap();
        let p2 = b.acquire(&mut now).unwrap();
        assert_eq!(
            b.acquire(&mut now).unwrap_err().retry_after(),
            Duration::ZERO
        );
        b.complete(p1, Verdict::Success, &mut now);
        assert_eq!(b.state(), State::HalfOpen);
        b.complete(p2, Verdict::Failure, &mut now);
        // 1 of 2 failed: 50% ≥ 50% re-opens.
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn released_probe_slot_admits_another() {
        let t0 = Instant::now();
        let b = breaker(settings(count(1, 1)), t0);
        call(&b, t0, Verdict::Failure).unwrap();
        let mut now = Now::at(t0 + Duration::from_secs(10));
        let p1 = b.acquire(&mut now).unwrap();
        let p2 = b.acquire(&mut now).unwrap();
        assert!(b.acquire(&mut now).is_err());
        b.release(p1);
        let p3 = b.acquire(&mut now).unwrap();
        b.complete(p2, Verdict::Success, &mut now);
        b.complete(p3, Verdict::Success, &mut now);
        assert_eq!(b.state(), State::Closed);
    }

    /// A failure admitted before the breaker tripped, that lands after it closed again
    /// (open, half-open, closed by its probes), belongs to a window that is gone: it
    /// does not trip the new one. (Landing while the breaker is open, as the test
    /// first had it, passes without the generation check: only a closed breaker trips.)
    #[test]
    fn late_result_from_before_a_transition_is_dropped() {
        let t0 = Instant::now();
        let fired = Arc::new(AtomicUsize::new(0));
        let f = fired.clone();
        let b = Breaker::new(
            settings(count(1, 1)),
            t0,
            Box::new(move |_: &Transition| {
                f.fetch_add(1, Relaxed);
            }),
        );
        let mut now = Now::at(t0);
        let late = b.acquire(&mut now).unwrap();
        call(&b, t0, Verdict::Failure).unwrap();
        assert_eq!(fired.load(Relaxed), 1, "closed → open");
        let after_break = t0 + Duration::from_secs(11);
        for _ in 0..2 {
            call(&b, after_break, Verdict::Success).unwrap();
        }
        assert_eq!(b.state(), State::Closed);
        assert_eq!(fired.load(Relaxed), 3, "→ half-open → closed");
        b.complete(late, Verdict::Failure, &mut Now::at(after_break));
        assert_eq!(
            b.state(),
            State::Closed,
            "the late failure tripped it again"
        );
        assert_eq!(fired.load(Relaxed), 3);
    }

    #[test]
    fn max_wait_in_half_open_reopens() {
        let t0 = Instant::now();
        let mut s = settings(count(1, 1));
        s.max_wait_in_half_open = Some(Duration::from_secs(5));
        let b = breaker(s, t0);
        call(&b, t0, Verdict::Failure).unwrap();
        let mut now = Now::at(t0 + Duration::from_secs(10));
        let _p1 = b.acquire(&mut now).unwrap();
        let _p2 = b.acquire(&mut now).unwrap();
        let mut later = Now::at(t0 + Duration::from_secs(15));
        assert!(b.acquire(&mut later).is_err());
        assert_eq!(b.state(), State::Open);
    }

    /// The wait is counted from the newest probe's admission, not from entering
    /// half-open: a probe let in late keeps its whole wait (before, a caller arriving
    /// just past the wait reopened the breaker though that probe had just started and
    /// every answered probe had succeeded); one that never answers still reopens it.
    #[test]
    fn max_wait_in_half_open_counts_from_the_newest_probe() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut s = settings(count(10, 10));
        s.permitted_probes = 3;
        s.max_wait_in_half_open = Some(Duration::from_secs(5));
        let b = breaker(s, t0);
        for _ in 0..10 {
            call(&b, t0, Verdict::Failure).unwrap();
        }
        assert_eq!(b.state(), State::Open);
        call(&b, at(10_500), Verdict::Success).unwrap();
        call(&b, at(10_600), Verdict::Success).unwrap();
        let _late = b.acquire(&mut Now::at(at(14_500))).unwrap();
        // 5.1 s after entering half-open, 1.1 s after the late probe.
        assert!(b.acquire(&mut Now::at(at(15_600))).is_err());
        assert_eq!(b.state(), State::HalfOpen);
        // The late probe never answers: 5 s after it, the breaker reopens.
        assert!(b.acquire(&mut Now::at(at(19_500))).is_err());
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn break_grows_with_consecutive_openings_up_to_the_cap() {
        let t0 = Instant::now();
        let mut s = settings(count(1, 1));
        s.permitted_probes = 1;
        s.break_multiplier = 2.0;
        s.max_break_duration = Duration::from_secs(30);
        let b = breaker(s, t0);
        let mut t = t0;
        let mut seen = Vec::new();
        call(&b, t, Verdict::Failure).unwrap();
        for _ in 0..4 {
            let d = b.retry_after(&mut Now::at(t)).unwrap();
            seen.push(d.as_secs());
            t += d;
            call(&b, t, Verdict::Failure).unwrap(); // the probe fails
        }
        assert_eq!(seen, [10, 20, 30, 30]);
        // Closing resets the growth.
        let d = b.retry_after(&mut Now::at(t)).unwrap();
        t += d;
        call(&b, t, Verdict::Success).unwrap();
        assert_eq!(b.state(), State::Closed);
        call(&b, t, Verdict::Failure).unwrap();
        assert_eq!(
            b.retry_after(&mut Now::at(t)),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn jitter_only_shortens_the_break() {
        let t0 = Instant::now();
        let mut s = settings(count(1, 1));
        s.jitter = 0.5;
        let b = breaker(s, t0);
        call(&b, t0, Verdict::Failure).unwrap();
        let d = b.retry_after(&mut Now::at(t0)).unwrap();
        assert!(
            d < Duration::from_secs(10) && d >= Duration::from_secs(5),
            "{d:?}"
        );
    }

    #[test]
    fn consecutive_failures_mode() {
        let t0 = Instant::now();
        let b = breaker(
            settings(Trip::Consecutive {
                n: 3,
                count: AtomicU64::new(0),
            }),
            t0,
        );
        call(&b, t0, Verdict::Failure).unwrap();
        call(&b, t0, Verdict::Failure).unwrap();
        call(&b, t0, Verdict::Success).unwrap();
        call(&b, t0, Verdict::Failure).unwrap();
        call(&b, t0, Verdict::Failure).unwrap();
        assert_eq!(b.state(), State::Closed);
        call(&b, t0, Verdict::Failure).unwrap();
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn slow_calls_trip_the_slow_rate() {
        let t0 = Instant::now();
        let mut s = settings(Trip::Rate {
            window: Window::Count(CountWindow::new(2)),
            minimum_calls: 2,
            slow_call_rate: Some(Rate::new(1.0)),
        });
        s.slow_call_duration = Some(Duration::from_millis(100));
        let b = breaker(s, t0);
        for _ in 0..2 {
            let p = b.acquire(&mut Now::at(t0)).unwrap();
            // Exactly the threshold is not slow.
            b.complete(
                p,
                Verdict::Success,
                &mut Now::at(t0 + Duration::from_millis(100)),
            );
        }
        assert_eq!(b.state(), State::Closed);
        for _ in 0..2 {
            let p = b.acquire(&mut Now::at(t0)).unwrap();
            b.complete(
                p,
                Verdict::Success,
                &mut Now::at(t0 + Duration::from_millis(101)),
            );
        }
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn time_window_trips_and_forgets() {
        let t0 = Instant::now();
        let b = breaker(
            settings(Trip::Rate {
                window: Window::Time(TimeWindow::new(10, 1_000_000_000)),
                minimum_calls: 2,
                slow_call_rate: None,
            }),
            t0,
        );
        call(&b, t0, Verdict::Failure).unwrap();
        // The failure left the 10 s window exactly at t0 + 10 s.
        call(&b, t0 + Duration::from_secs(10), Verdict::Failure).unwrap();
        assert_eq!(b.state(), State::Closed);
        call(&b, t0 + Duration::from_secs(11), Verdict::Failure).unwrap();
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn manual_states() {
        let t0 = Instant::now();
        let b = breaker(settings(count(1, 1)), t0);
        let mut now = Now::at(t0);
        b.force(State::ForcedOpen, false, &mut now);
        assert!(call(&b, t0 + Duration::from_secs(100), Verdict::Success).is_err());
        b.force(State::Disabled, false, &mut now);
        for _ in 0..5 {
            call(&b, t0, Verdict::Failure).unwrap();
        }
        assert_eq!(b.state(), State::Disabled);
        assert_eq!(b.metrics(&mut now).calls(), 0, "a disabled breaker records");
        b.force(State::MetricsOnly, false, &mut now);
        call(&b, t0, Verdict::Failure).unwrap();
        assert_eq!(b.state(), State::MetricsOnly);
        assert_eq!(b.metrics(&mut now).failures(), 1);
        b.force(State::Closed, true, &mut now);
        let m = b.metrics(&mut now);
        assert_eq!((m.calls(), m.not_permitted()), (0, 0));
    }
}
