//! Timeouts: one per attempt ([`AttemptTimeout`]) and one for everything inside
//! ([`Deadline`]), propagated to the next hop.
//!
//! * [`AttemptTimeout`] sits innermost in a client stack: it bounds one attempt and
//!   drops (cancels) the inner future when it expires, failing with
//!   [`error::Elapsed`]. A retry outside it sees a retryable failure.
//! * [`Deadline`] sits outside the retry: one budget for all attempts, backoff sleeps
//!   included. With [`HttpPropagation`] (`DeadlineLayer::http`), it stores the
//!   deadline in the request (an extension of type [`CallDeadline`], which a retry and
//!   [`BodyDeadlineLayer`] inside read) and writes `grpc-timeout`
//!   (gRPC requests) and [`TIMEOUT_MS_HEADER`] with the remaining time so the next hop
//!   can stop early. A request whose deadline has already passed fails with
//!   [`error::DeadlineExceeded`] without calling the inner service.
//!
//! Without propagation both timers start at the end of the response future's first
//! poll, and cost nothing when the inner future completes in it: the clock is read,
//! and a timer armed, only once the inner future has returned pending (so work done
//! synchronously inside that first poll is not counted). With
//! [`HttpPropagation`] the deadline starts at `call` (it is written into the request).
//!
//! Both bound the response future, which completes with the response's *head*: a
//! body the server stalls in is read after it, unbounded by them (as with tower's
//! `Timeout`). [`BodyDeadlineLayer`], inside [`DeadlineLayer::http`], carries the
//! call's [`CallDeadline`] over to the response body: a frame still pending at the
//! deadline fails the body with [`error::BodyDeadlineExceeded`]. (Or bound the body
//! read yourself: reqwest's `Client::builder().timeout`, or buffer the body inside the
//! deadline.)
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use postbox::timeout::{AttemptTimeoutLayer, DeadlineLayer};
//! use tower::{ServiceBuilder, service_fn};
//!
//! # fn main() -> Result<(), postbox::error::ConfigError> {
//! let svc = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new(Duration::from_secs(2))?)
//!     .layer(AttemptTimeoutLayer::new(Duration::from_millis(500))?)
//!     .service(service_fn(|x: u32| async move { Ok::<_, postbox::BoxError>(x) }));
//! # let _ = svc; Ok(()) }
//! ```
//!
//! # Cancel safety
//! Dropping a response future drops the inner future and its timer.

#[cfg(feature = "http")]
mod body;
pub mod error;
pub mod future;
mod layer;
mod service;

#[cfg(feature = "http")]
pub use self::body::{BodyDeadline, BodyDeadlineFuture, BodyDeadlineLayer, DeadlineBody};
pub use self::layer::{AttemptTimeoutLayer, DeadlineLayer};
pub use self::service::{AttemptTimeout, CallDeadline, Deadline, NoPropagation, Propagate};
#[cfg(feature = "http")]
pub use self::service::{
    HttpPropagation, TIMEOUT_MS_HEADER, encode_grpc_timeout, parse_grpc_timeout,
};
#[cfg(feature = "http")]
pub(crate) use self::service::{
    anchor_caller_timeout, refresh_stale_deadline_headers, rewrite_deadline_headers,
};
