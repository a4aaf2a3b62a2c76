//! HTTP glue: reqwest as a `tower::Service`, errors answered as responses for axum,
//! replayable request bodies and the `Idempotency-Key` header.
//!
//! * [`body`]: [`BufferBodyLayer`](body::BufferBodyLayer) buffers a request body up to
//!   a limit so the retry layer (and the enqueue fallback) can send it again; a larger
//!   body is streamed through once and marked [`BodyNotReplayable`](body::BodyNotReplayable).
//! * [`idempotency_key`]: the header, the idempotent methods, and a generator.
//!
//! # Example
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use postbox::http::body::{BufferBodyLayer, ReplayBody};
//! use postbox::retry::RetryLayer;
//! use tower::{ServiceBuilder, service_fn};
//!
//! # fn main() -> Result<(), postbox::error::ConfigError> {
//! let client = ServiceBuilder::new()
//!     .layer(BufferBodyLayer::new(64 * 1024))
//!     .layer(RetryLayer::http().build()?)
//!     .service(service_fn(|req: http::Request<ReplayBody<Full<Bytes>>>| async move {
//!         // Every attempt gets the whole body (or, above 64 KiB, the one attempt does).
//!         let _ = req.body().buffered_bytes();
//!         Ok::<_, postbox::BoxError>(http::Response::new(()))
//!     }));
//! # let _ = client;
//! # Ok(()) }
//! ```

pub mod body;
pub mod idempotency_key;
#[cfg(feature = "reqwest")]
pub mod reqwest;
mod respond;

pub use self::respond::{ErrorResponse, ErrorResponseLayer};
