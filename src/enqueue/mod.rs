//! Enqueue instead of block: defer a write whose dependency is down, deliver it later.
//!
//! * [`EnqueueFallback`] (HTTP, [`EnqueueFallbackLayer`]) and [`Defer`] (any request
//!   type with a [`RequestCodec`], [`DeferLayer`]) sit outermost in a client stack. On
//!   an outcome that may be deferred they store the request in a
//!   [`Queue`](crate::queue::Queue) and answer with a [`Receipt`] — `202 Accepted` for
//!   HTTP, [`Deferred::Enqueued`] for the typed flavour.
//! * The [`Replayer`] leases stored messages and replays them through the stack inside,
//!   with their original idempotency key.
//! * The server-side [`Idempotency`](crate::idempotency) layer turns at-least-once
//!   delivery into an exactly-once effect.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use postbox::BoxError;
//! use postbox::enqueue::{BufferedBody, EnqueueConfig, EnqueueFallbackLayer, DeferPolicy, Replayer};
//! use postbox::queue::Queue;
//! use tower::{ServiceBuilder, service_fn};
//!
//! type Inner = Request<BufferedBody<Full<Bytes>>>;
//!
//! async fn send(_req: Inner) -> Result<Response<Full<Bytes>>, BoxError> {
//!     Ok(Response::new(Full::default())) // your resilient client stack goes here
//! }
//!
//! fn client<Q: Queue>(queue: Arc<Q>) -> Result<(), postbox::error::ConfigError> {
//!     let config = EnqueueConfig::new()
//!         .policy(DeferPolicy::new().keep_sync_route("/payments/"))
//!         .max_body(256 * 1024);
//!     // Outermost: sees the final outcome of everything inside.
//!     let client = ServiceBuilder::new()
//!         .layer(EnqueueFallbackLayer::with_config(queue.clone(), config)?)
//!         .service(service_fn(send));
//!     // The replayer delivers through the stack *inside* the fallback.
//!     let replayer = Replayer::http(queue, service_fn(send)).concurrency(8);
//!     # let _ = (client, replayer);
//!     Ok(())
//! }
//! ```
//!
//! Call `replayer.spawn()` inside a tokio runtime to start it; keep the
//! [`ReplayerHandle`] and call [`shutdown`](ReplayerHandle::shutdown) on the way out.
//!
//! # Enqueue semantics
#![doc = include_str!("../docs/enqueue.md")]

#[cfg(feature = "http")]
pub(crate) mod body;
mod clock;
mod codec;
pub mod error;
pub mod future;
mod layer;
mod policy;
mod receipt;
pub mod replay;
mod service;

#[cfg(feature = "http")]
pub use self::body::BufferedBody;
#[cfg(feature = "http")]
pub use self::codec::HttpCodec;
pub use self::codec::{Captured, RequestCodec};
#[cfg(feature = "http")]
pub use self::layer::EnqueueFallbackLayer;
pub use self::layer::{DeferLayer, EnqueueConfig};
pub use self::policy::{DeferPolicy, Trigger, trigger};
pub use self::receipt::{
    DEFER_REASON_HEADER, Deferred, IDEMPOTENCY_KEY_HEADER, MESSAGE_ID_HEADER, Receipt, reason_str,
};
#[cfg(feature = "http")]
pub use self::replay::HttpJudge;
pub use self::replay::{ClassifierJudge, Judge, ReplayStats, Replayer, ReplayerHandle, Verdict};
pub use self::service::Defer;
#[cfg(feature = "http")]
pub use self::service::EnqueueFallback;
