//! Bulkhead: at most `max_concurrent` calls in flight, at most `max_waiting` waiting
//! for up to `max_wait`, everyone else rejected at once with [`error::Full`].
//!
//! A permit is reserved in `poll_ready`, moved into the response future by `call`, and
//! released when that future completes or is dropped. Every service made by one
//! [`BulkheadLayer`] (and every clone of them) shares the same permits.
//!
//! The response future completes with the response's *head*: a streaming response
//! body (an HTTP download, a gRPC server stream) is read after the permit is back, as
//! with tower's `ConcurrencyLimit`. The bulkhead bounds calls being made, not streams
//! being read; bound long streams in the handler, or buffer the body inside the
//! bulkhead.
//!
//! Waiting is not strictly first-come first-served: a woken waiter competes with new
//! callers for the freed permit, and one that loses it waits again behind the waiters
//! queued since (it may give up at its `max_wait` while younger waiters get through).
//! Not letting new callers take a free permit while others wait would make the order
//! strict, but a waiter that is not polled would then hold every new caller off.
//! A service whose `poll_ready` returned `Pending` holds its place in the queue (and
//! a waiting slot) until it is polled again or dropped: a freed permit's wake-up goes
//! to it. Keep polling it, or drop it (a `select!` that gave up on `ready()` should
//! drop the service it was readying); otherwise the next waiter waits for the release
//! after, as with tower's `ConcurrencyLimit`.
//!
//! # Two answers to overload
//!
//! | mode | configure | `poll_ready` when full | rejection |
//! |---|---|---|---|
//! | **fail fast** (default) | `max_waiting(0)` | `Ready` at once | `call` fails with [`error::Full`] at once |
//! | bounded wait | `max_waiting(m)`, `max_wait(d)` | `Pending` for up to `d` (while fewer than `m` wait) | after `d`, or at once when `m` already wait |
//! | **backpressure** | [`backpressure()`](BulkheadBuilder::backpressure) | `Pending` until a permit frees | never (like tower's `ConcurrencyLimit`) |
//!
//! Fail fast suits servers: axum assumes services are always ready, and a quick 503
//! (the [`IntoResponse`](axum_core::response::IntoResponse) mapping of
//! [`error::Full`] adds `Retry-After`) beats a pile-up. A rejection is a *ready* service
//! whose `call` fails, never an error from `poll_ready`, so the service stays usable.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use postbox::bulkhead::BulkheadLayer;
//! use tower::{ServiceBuilder, service_fn};
//!
//! # fn main() -> Result<(), postbox::error::ConfigError> {
//! let bulkhead = BulkheadLayer::builder()
//!     .max_concurrent(32)
//!     .max_waiting(8)
//!     .max_wait(Duration::from_millis(50))
//!     .build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(bulkhead)
//!     .service(service_fn(|x: u32| async move { Ok::<_, postbox::BoxError>(x) }));
//! # let _ = svc; Ok(()) }
//! ```
//!
//! # One bulkhead per dependency
//! A client that calls several hosts through one stack should not let one slow host
//! take every permit: [`BulkheadBuilder::keyed`] (or
//! [`keyed_by_authority`](BulkheadBuilder::keyed_by_authority)) builds a
//! [`KeyedBulkhead`], one bulkhead per key with the same limits (Envoy's limits are
//! per cluster for the same reason). The config client stack has one per authority.
//! Admission then happens in `call`, as the key comes from the request, and a call
//! that must wait waits in its response future: put a keyed bulkhead *outside* a
//! circuit breaker (the config stack does), or the time a call waits for its permit
//! counts on the breaker's clock as the call's own, and the breaker's slow-call rate
//! rises with our own queueing.
//!
//! # Cancel safety
//! Dropping the response future releases its permit; dropping a service that is
//! waiting gives up its waiting slot.

pub mod error;
pub mod future;
mod keyed;
mod layer;
mod service;

pub use self::keyed::{KeyedBulkhead, KeyedBulkheadLayer, KeyedResponseFuture};
pub use self::layer::{BulkheadBuilder, BulkheadLayer};
pub use self::service::Bulkhead;
