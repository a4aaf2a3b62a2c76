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
//! A client whose dependency is down gets a receipt; the replayer delivers the request
//! once it is back. ([`MemoryQueue`](crate::queue::MemoryQueue) is for tests: use the
//! durable embedded queue in production.)
//! ```
//! use std::{sync::Arc, time::Duration};
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use postbox::BoxError;
//! use postbox::circuit_breaker::error::Open;
//! use postbox::enqueue::{
//!     BufferedBody, DeferPolicy, EnqueueConfig, EnqueueFallbackLayer, MESSAGE_ID_HEADER, Replayer,
//! };
//! use postbox::queue::MemoryQueue;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! // What the stack inside the fallback receives.
//! type Inner = Request<BufferedBody<Full<Bytes>>>;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let queue = Arc::new(MemoryQueue::new());
//!
//! // Stands in for deadline + retry + breaker + bulkhead + client: the breaker is open.
//! let down = service_fn(|_req: Inner| async {
//!     Err::<Response<Full<Bytes>>, BoxError>(Open::new(Duration::from_secs(5)).into())
//! });
//! let config = EnqueueConfig::new()
//!     .policy(DeferPolicy::new().keep_sync_route("/payments/"))
//!     .max_body(256 * 1024);
//! let client = ServiceBuilder::new()
//!     .layer(EnqueueFallbackLayer::with_config(queue.clone(), config)?) // outermost
//!     .service(down);
//!
//! let req = Request::post("http://orders.internal/orders").body(Full::from("{\"sku\":42}"))?;
//! let res = client.oneshot(req).await?;
//! assert_eq!(res.status(), StatusCode::ACCEPTED);
//! println!("deferred as {:?}", res.headers()[MESSAGE_ID_HEADER]);
//!
//! // Later, the dependency is back: replay through the stack inside the fallback.
//! let up = service_fn(|_req: Inner| async { Ok::<_, BoxError>(Response::new(Full::<Bytes>::default())) });
//! let replayer = Replayer::http(queue.clone(), up).concurrency(8).spawn()?;
//! while replayer.stats().replayed < 1 {
//!     tokio::time::sleep(Duration::from_millis(100)).await;
//! }
//! replayer.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Enqueue semantics
#![doc = include_str!("../docs/enqueue.md")]

#[cfg(feature = "http")]
pub(crate) mod body;
mod clock;
#[cfg(not(feature = "http"))]
pub(crate) use self::clock::usable_key;
pub(crate) mod codec;
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
    DEFER_REASON_HEADER, DUPLICATE_HEADER, Deferred, IDEMPOTENCY_KEY_HEADER, MESSAGE_ID_HEADER,
    Receipt, reason_str,
};
#[cfg(feature = "http")]
pub use self::replay::HttpJudge;
pub use self::replay::{
    ClassifierJudge, DEFAULT_MAX_RETRY_AFTER, Judge, ReplayStats, Replayer, ReplayerHandle, Verdict,
};
pub use self::service::Defer;
#[cfg(feature = "http")]
pub use self::service::EnqueueFallback;
