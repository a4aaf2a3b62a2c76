//! Retry: backoff with jitter, a shared retry budget, server hints, idempotency.
//!
//! [`Retry`] calls the inner service, asks the [classifier](crate::classify) whether the
//! outcome is retryable and, if the policy allows, waits and tries again. When it stops
//! it returns the **last outcome** unchanged: the error type is the inner service's.
//!
//! * **Attempts**: `max_retries(3)` means **up to 4 attempts in all** (Polly's
//!   counting; resilience4j counts the first call in `maxAttempts`).
//! * **Backoff**: constant, linear or exponential, capped, with no / full / equal /
//!   decorrelated jitter ([`backoff`]). The jitter source is injectable
//!   ([`JitterRng::seeded`]) so tests are deterministic.
//! * **Server hints**: a classification's [`retry_after`](crate::classify::Classification::retry_after)
//!   (`Retry-After` in seconds or as an HTTP-date, `grpc-retry-pushback-ms`, an open
//!   breaker's [`Open::retry_after`](crate::circuit_breaker::error::Open::retry_after);
//!   not a breaker [forced open](crate::circuit_breaker::error::Open::is_forced), which
//!   is not retried)
//!   replaces the backoff when it is longer, rounded **up** to the millisecond so the
//!   retry is never early. A jittering backoff adds a random share of up to half the
//!   hint (at most its `max_delay`; Envoy waits 1–1.5× the hint), so callers told the
//!   same instant do not all come back at once — unless that would pass the call's
//!   deadline. A hint above [`max_retry_after`](RetryBuilder::max_retry_after)
//!   (60 s by default, at most one day) ends the retries at once. An open breaker's
//!   break has a bound of its own, [`max_open_wait`](RetryBuilder::max_open_wait)
//!   (`max_retry_after` unless set): a caller that would wait longer gets the
//!   rejection at once (fails fast, or is deferred by an enqueue fallback outside).
//! * **Budget**: a [`RetryBudget`] shared by every service of a layer (and by any layer
//!   given a clone of it) bounds retries to a share of recent first attempts plus a floor
//!   (20% and 10/s by default). A retry after an open breaker's rejection (nothing
//!   reached the dependency, and the breaker lets only its probes through) takes
//!   nothing from it. When it is
//!   spent the last outcome is returned, the
//!   `postbox_retry_budget_exhausted_total` counter grows and a `debug` event says why.
//! * **Idempotency**: after an attempt that may have taken effect, only retry-safe
//!   requests are retried ([`CloneRequest::is_retry_safe`]). For HTTP
//!   (`HttpRequests`): idempotent methods (`GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`,
//!   `DELETE`), gRPC methods named with `idempotent_grpc_method`
//!   (`retry.idempotent_grpc_methods` in a config file), or requests with an
//!   `Idempotency-Key`, optionally generated for the others. A failure that certainly
//!   had no effect (a refused connection, an open breaker, but not one forced open,
//!   which is not retried) is retried whatever the method.
//! * **Replay**: the request is cloned for every attempt but the last, which sends the
//!   original; a request that cannot be cloned (an HTTP body too large for
//!   `http::body::BufferBodyLayer`) is sent once.
//! * **Readiness** is polled again before every retry.
//!
//! | what stops a retry | outcome returned | `reason` in the `debug` event and `postbox_retry_gave_up_total` |
//! |---|---|---|
//! | not retryable (success, 4xx, …) | as is, silently | — |
//! | `max_retries` reached | last outcome | `max_retries` |
//! | request cannot be replayed | last outcome | `not_replayable` |
//! | not retry-safe and may have taken effect | last outcome | `not_retry_safe` |
//! | server hint above `max_retry_after` | last outcome, at once | `retry_after_too_long` |
//! | an open breaker inside whose break ends after `max_open_wait` | the rejection, at once | `circuit_open` |
//! | budget spent | last outcome | `budget_exhausted` |
//! | the next try would start at or after the call's deadline (a `CallDeadline` on an HTTP request, or a timeout the caller set in its `grpc-timeout` / `postbox-timeout-ms` header, counted from the first attempt), or had passed when the backoff was over (the task polled late); a wait for readiness after the backoff is not bounded by it | last outcome, at once (held through the backoff only when there is a deadline) | `deadline` |
//! | the inner service fails its readiness before the retry (a closed connection) | that readiness error, not the last outcome (a retry was already counted) | — |
//!
//! # Telemetry
//! `tracing`: a `debug` event for every failed attempt that is retried (attempt number,
//! delay, class, hint) and when a retried call finishes, and one when a retryable
//! failure is returned (none with `max_retries(0)`, retries switched off; `debug`, not
//! `warn`: in an outage every call ends so, and the counter says how many); no event
//! when the first attempt settles the call. Every attempt
//! runs in a `debug` span `retry_attempt{attempt}` (1 for the first, 2 for the first
//! retry; a retry's wait for readiness too, not the first attempt's, which is the
//! caller's `poll_ready`), so the events of the layers inside (breaker, bulkhead,
//! attempt timeout) say which attempt they belong to; with no subscriber interested the span is disabled
//! and costs a check of a static. An [`OnRetry`] hook
//! sees every retry.
//!
//! `metrics` counters:
//!
//! | counter | counts |
//! |---|---|
//! | `postbox_retry_attempts_total` | every attempt, first attempts included |
//! | `postbox_retries_total` | retries scheduled |
//! | `postbox_retry_budget_exhausted_total` | retries refused by the budget |
//! | `postbox_retry_gave_up_total{reason}` | retryable failures returned, by `reason` (table above) |
//!
//! First attempts are counted through a handle registered when the service is made, so
//! the happy path skips the recorder lookup: install the `metrics` recorder before
//! building the stack.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use postbox::retry::{RetryLayer, backoff::{Backoff, Jitter}};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), postbox::BoxError> {
//! let retry = RetryLayer::builder()
//!     .max_retries(3) // up to 4 attempts in all
//!     .backoff(
//!         Backoff::exponential(Duration::from_millis(1))
//!             .with_max_delay(Duration::from_millis(10))
//!             .with_jitter(Jitter::Full),
//!     )
//!     .on_retry(|e: &postbox::retry::RetryEvent| println!("retry #{} in {:?}", e.attempt(), e.delay()))
//!     .build()?;
//!
//! let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
//! let svc = ServiceBuilder::new().layer(retry).service(service_fn({
//!     let calls = calls.clone();
//!     move |x: u32| {
//!         let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!         async move {
//!             if n < 2 {
//!                 Err::<u32, postbox::BoxError>(std::io::Error::from(std::io::ErrorKind::ConnectionReset).into())
//!             } else {
//!                 Ok(x)
//!             }
//!         }
//!     }
//! }));
//! assert_eq!(svc.oneshot(7).await?, 7); // two failures, then success
//! # Ok(()) }
//! ```
//!
//! HTTP clients (feature `http`) start from `RetryLayer::http` and put
//! `http::body::BufferBodyLayer` outside the retry so bodies
//! can be replayed.
//!
//! # Panics
//! A retry with a non-zero delay sleeps on the Tokio timer, so it needs a Tokio runtime
//! with the time driver enabled (as tower's `retry::backoff` does); calls settled by
//! their first attempt and zero delays never touch it.
//!
//! # Cancel safety
//! Dropping the response future drops the attempt in flight or the pending backoff
//! sleep; no further attempt is made. A budget withdrawal already made is not refunded.

pub mod backoff;
pub mod budget;
mod config;
pub mod future;
mod layer;
mod policy;
mod service;

pub use self::backoff::JitterRng;
pub use self::budget::{RetryBudget, RetryBudgetBuilder};
pub use self::config::{BackoffConfig, BackoffKind, BudgetConfig, RetryConfig};
pub use self::layer::{
    DEFAULT_MAX_RETRIES, DEFAULT_MAX_RETRY_AFTER, DefaultPolicy, RetryBuilder, RetryLayer,
};
#[cfg(feature = "http")]
pub use self::policy::HttpRequests;
pub use self::policy::{AttemptLog, CloneRequest, Cloned, OnRetry, RetryEvent, RetryPolicy};
pub use self::service::Retry;
