//! Circuit breaker: stops calling a failing dependency and rejects at once with
//! [`error::Open`] until it is time to probe again.
//!
//! # States
//! [`State::Closed`] → (failure or slow-call rate ≥ threshold) → [`State::Open`] →
//! (break elapsed, on the next call) → [`State::HalfOpen`] → (the probes' failure rate
//! below the threshold) → `Closed`, or back to `Open`. Three manual states sit beside
//! them: [`State::Disabled`], [`State::ForcedOpen`], [`State::MetricsOnly`], set from a
//! [`CircuitBreakerHandle`].
//!
//! Where peers differ:
//!
//! | | postbox | resilience4j |
//! |---|---|---|
//! | count window | the last N calls, exactly (a ring) | the last N calls (tower-resilience 0.14: cumulative counters) |
//! | `minimum_calls` > count window | capped at the window size | capped |
//! | half-open admission | exactly `permitted_probes` under any concurrency; a dropped probe gives its slot back | leaks permits under load (its issues #903, #1432) |
//! | half-open judgment | once min(`minimum_calls`, `permitted_probes`) probes are done (all of them in consecutive-failures mode); later probes' results are dropped | the same |
//! | rejection | [`error::Open`], carrying `retry_after` | `CallNotPermittedException`, no hint |
//!
//! # What is recorded
//! Every outcome is asked of one [`Classify`](crate::classify::Classify)
//! implementation (see [`classify`](crate::classify)): failures **and overloads**
//! count against the rate; successes count for it; *ignored* outcomes (our own
//! rejections — [`error::Open`], [`bulkhead::error::Full`](crate::bulkhead::error::Full)
//! — and whatever a classifier marks ignored) are not recorded at all, and an ignored
//! probe gives its slot back. A call is *slow* when it takes strictly longer than the
//! configured duration (slow-call tracking is off unless configured). A late result
//! from a call admitted before a transition is dropped: it can never fire a second
//! transition.
//!
//! # Trip rules
//! * rate mode (default): failure rate ≥ `failure_rate_threshold`, or slow-call rate ≥
//!   its threshold, evaluated once the window holds `minimum_calls` calls; the window
//!   is a [count window](CircuitBreakerBuilder::count_window) or a
//!   [time window](CircuitBreakerBuilder::time_window);
//! * [consecutive-failures mode](CircuitBreakerBuilder::consecutive_failures): `n`
//!   failures in a row.
//!
//! The break is fixed or [grows](CircuitBreakerBuilder::break_backoff) with
//! consecutive openings, capped and optionally
//! [jittered](CircuitBreakerBuilder::break_jitter).
//!
//! # Cost
//! The hot state is a single atomic word; the window is atomics; a mutex is taken only
//! on transitions (and by a time window once per bucket width). Each call moves an
//! owned reference to the breaker into its response future; a layer keeps eight
//! reference counts, each on its own cache line, and a call takes its thread's, so
//! callers on several workers do not fight over one line. A closed breaker with a count
//! window and no slow-call tracking reads no clock and allocates nothing per call.
//!
//! Where only a coarse time is needed, the breaker reads `CLOCK_MONOTONIC_COARSE`
//! (about 5 ns, within one kernel tick of the precise clock) instead of tokio's clock
//! (about 25 ns): a time window picks its bucket with it (a bucket boundary may move by
//! a tick), and an open breaker rejects with it while the break is certainly not over.
//! The last 20 ms of a break are checked with tokio's clock, so a probe is never
//! admitted early. Under paused tokio time (tests), and on platforms other than Linux,
//! tokio's clock is used throughout; which clock applies is decided at the breaker's
//! first call. Slow-call tracking reads tokio's clock when the call is made (in `call`,
//! so time spent waiting for the inner service to be ready is not the call's) and at
//! completion.
//!
//! The service's error is [`error::Error`]: the rejection or the inner error, unboxed,
//! so a rejection allocates nothing. It converts into [`BoxError`](crate::BoxError)
//! (`?`, `.into()`, or `ServiceBuilder::map_err(BoxError::from)` in a stack that must
//! name `BoxError`), where a rejection is the boxed [`error::Open`]. The house style
//! boxes every layer's errors; here a rejection that allocates nothing wins, as in
//! tower-resilience (`CircuitBreakerError<E>`): with `BoxError`, the open path spent a
//! third of its instructions in `malloc` and `free` (444 per call against 294, counted
//! with callgrind by `examples/breaker_calls.rs`), while the larger `Result` of a small
//! response costs the closed path 6 instructions (223 against 217; a response of a few
//! words or more is returned through memory either way).
//!
//! # Telemetry
//! Every transition is a `tracing` info event, a `postbox_circuit_transitions_total{breaker,from,to}`
//! count, a `postbox_circuit_state{breaker}` gauge (see [`State::gauge_value`]) and a
//! call of the [`OnTransition`] hook. Rejections always count in
//! `postbox_calls_total{layer="circuit_breaker",outcome="rejected"}`; the other
//! outcomes (`success`, `failure`, `ignored`) are opt-in
//! ([`count_calls`](CircuitBreakerBuilder::count_calls)): nearly free with no
//! recorder, but a recorder's cost per call; the [`Metrics`] snapshot has the window's
//! counts for free.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use postbox::circuit_breaker::{CircuitBreakerLayer, State};
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let breaker = CircuitBreakerLayer::builder()
//!     .count_window(20)
//!     .minimum_calls(10)
//!     .failure_rate_threshold(0.5)
//!     .break_duration(Duration::from_secs(2))
//!     .break_backoff(2.0, Duration::from_secs(60))
//!     .permitted_probes(3)
//!     .on_transition(|t: &postbox::circuit_breaker::Transition| {
//!         println!("breaker {} went {} -> {}", t.name(), t.from(), t.to());
//!     })
//!     .build()?;
//! let handle = breaker.handle();
//!
//! let mut svc = ServiceBuilder::new()
//!     .layer(breaker)
//!     .service(service_fn(|x: u32| async move { Ok::<_, postbox::BoxError>(x * 2) }));
//!
//! assert_eq!(svc.ready().await?.call(21).await?, 42);
//! assert_eq!(handle.state(), State::Closed);
//!
//! handle.force_open();
//! let err = svc.ready().await?.call(1).await.unwrap_err();
//! assert!(err.open().is_some()); // circuit_breaker::Error::Open, not boxed
//! // Boxed (as `?` does), it is the `Open` error itself:
//! let err = postbox::BoxError::from(err);
//! assert!(postbox::error::is_caused_by::<postbox::circuit_breaker::error::Open>(&*err));
//! # Ok(()) }
//! ```
//!
//! # Cancel safety
//! Dropping a response future records nothing (unless the breaker counts dropped
//! calls as failures: `count_dropped`). If the call was a half-open probe, its
//! slot is given back at once (also when the inner future panics), so the breaker
//! cannot be left waiting for a probe that will never report. A service dropped between
//! `poll_ready` and `call` gives back a probe slot it reserved the same way.

mod config;
pub mod error;
pub mod future;
mod handle;
pub(crate) mod keyed;
mod layer;
mod service;
mod shared;
mod state;
mod window;

pub use self::config::{CircuitBreakerBuilder, CircuitBreakerConfig, WindowConfig};
pub use self::handle::CircuitBreakerHandle;
#[cfg(feature = "http")]
pub use self::keyed::ByAuthority;
pub use self::keyed::{
    KeyFn, KeyedCircuitBreaker, KeyedCircuitBreakerBuilder, KeyedCircuitBreakerHandle,
    KeyedCircuitBreakerLayer,
};
pub use self::layer::CircuitBreakerLayer;
pub use self::service::CircuitBreaker;
pub use self::state::{Metrics, OnTransition, State, Transition};
