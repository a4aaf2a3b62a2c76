//! Exactly-once effect for servers: answer repeated requests with the same
//! `Idempotency-Key` from memory instead of running the handler again.
//!
//! Delivery of deferred requests is at least once: a replay whose response was lost is
//! replayed again. [`Idempotency`] on the receiving service makes the *effect* exactly
//! once:
//!
//! * the first request with a key claims it, runs the handler, and the response
//!   (status, headers, body — buffered, up to a limit — and trailers) is remembered
//!   for a TTL;
//! * a later request with the same key, method, host and path is answered from the store
//!   without calling the handler, with the header [`REPLAYED_HEADER`]
//!   (`idempotent-replayed: true`);
//! * a duplicate arriving while the first runs **waits** for it (it does not run the
//!   handler twice), then gets the same answer; one still waiting `lock_for` after it
//!   came (the key claimed again and again by failing attempts), or just before its
//!   own deadline (a [`CallDeadline`](crate::timeout::CallDeadline) a deadline layer
//!   outside set), is answered `409 Conflict` with `Retry-After` ("Request in
//!   progress", as the IETF draft advises);
//! * a repeat that is **not the same request** — another query, content type or body
//!   under a key already used (a client bug) — is answered `422 Unprocessable Content`
//!   (`application/problem+json`, "Idempotency-Key is already used", as the IETF
//!   idempotency-key draft advises) instead of with the first request's response. The
//!   handler reads the body through [`FingerprintedBody`], which hashes it on the way
//!   (no copy); a repeat's body is read and hashed by the layer. A first request whose
//!   handler did not read its whole body (it answered from the head) is fingerprinted
//!   by its head alone, and its repeats are compared by method, path and query and
//!   content type only. A `4xx` answered without reading the whole of a body (a body
//!   limit's `413`, decided from `Content-Length` or midway; a parser that failed
//!   midway; a `415` or a `400` for the query, decided from the head) is not
//!   remembered: the body may have decided it, so a corrected repeat runs (a refusal
//!   made nothing happen; a refusal of a request without a body is remembered);
//! * requests without the header pass through untouched (in a [`FingerprintedBody`]
//!   that only forwards) — or, with [`require_key`](IdempotencyLayer::require_key),
//!   those of an unsafe method are answered `400` ("Idempotency-Key is missing") —
//!   and so do calls of the gRPC methods named in
//!   [`stream_through`](IdempotencyLayer::stream_through) (name every streaming one:
//!   a remembered answer is read to its end before it is sent);
//! * a server-sent event stream (`text/event-stream`), and a response carrying the
//!   [`StreamThrough`] extension (another kind of stream), is streamed, not
//!   remembered.
//!
//! A `5xx` response, a "try again later" answer (`408`, `425`, `429`), a conflict with
//! another request (`409`, `423`), a request its client closed (`499`), a
//! refused credential (`401`, `403`: the retry with a fresh one must run), an error, a
//! response body over the limit, or the answer to a request whose body failed to
//! arrive is **not** remembered: the claim is released and the next request with the
//! key runs the handler.
//!
//! A store that fails to claim a key (a shared store unreachable) **fails open**: the
//! request runs without de-duplication, with a `warn` event and
//! `postbox_calls_total{layer="idempotency",outcome="store_failed"}`, so an outage of
//! the store does not take the service down with it, but a duplicate arriving then
//! runs the handler again. A store that must fail closed can report the key
//! [`InProgress`](Claim::InProgress) while it is unreachable instead of an error: the
//! request then waits, and is answered `409` with `Retry-After` once `lock_for` is up.
//!
//! A request that claimed a key runs to its end in a task of its own, even if its
//! client goes away or a deadline layer outside gives up on it: a handler cut off
//! between its effect and its answer would let the retry make the effect twice. Its
//! duplicate waits and gets the stored answer. While its client waits, its claim is
//! renewed half-way through what is left of it ([`IdempotencyStore::extend`]), so a
//! handler slower than `lock_for` keeps its key; once its client is gone, it runs
//! until its claim expires (at most `lock_for` later), then it is cancelled and the
//! claim released. Put a concurrency limit inside this layer, so that a handler that
//! goes on after its client left still holds its permit.
//!
//! gRPC works the same (tonic: `Server::builder().layer(IdempotencyLayer::new(..))`,
//! the key in `idempotency-key` metadata; a duplicate of a call still running is
//! answered `UNAVAILABLE` with `grpc-retry-pushback-ms` and
//! [`postbox-in-progress`](crate::classify::grpc::IN_PROGRESS_HEADER), which a postbox
//! client reads as HTTP's `409`: retried, not counted against the server): the outcome is the `grpc-status` in the
//! trailers, or in the headers of a trailers-only answer (gRPC-Web, binary: in the
//! trailers frame at the end of the body; the base64 `grpc-web-text` is not read, and
//! its answers are never remembered: put the layer inside tonic-web's translation to
//! cover it), and the same kinds are not
//! remembered: `CANCELLED`, `UNKNOWN` (and a missing status: also a gRPC request's
//! answer from something that is no gRPC server, a `200` HTML page or any other HTTP
//! status without `grpc-status`, which its client reads as a failure), `DEADLINE_EXCEEDED`,
//! `RESOURCE_EXHAUSTED`, `ABORTED`, `UNIMPLEMENTED`, `INTERNAL`, `UNAVAILABLE`,
//! `DATA_LOSS`, `UNAUTHENTICATED` and `PERMISSION_DENIED`. `OK` and the caller's errors (`INVALID_ARGUMENT`, `NOT_FOUND`,
//! `ALREADY_EXISTS`, …) are, unless the handler answered with a trailers-only error
//! before it read the whole request (an interceptor's refusal, tonic's "message too
//! large"): as an HTTP `4xx` decided from the head, that answer is not remembered, so
//! a corrected repeat runs. tonic answers every handler's `Err(Status)` trailers-only,
//! so a client-streaming handler that acted on some messages and then failed before
//! reading the rest is not remembered either: its repeat runs again (the layer cannot
//! tell the two apart). A Connect-protocol stream (`application/connect+…`, always
//! `200 OK`) is judged the same by the error code in its end-of-stream message (none:
//! `OK`; a stream without a readable end: `UNKNOWN`); a Connect unary call's error is
//! an HTTP status, judged as HTTP. Keys are scoped by method, host (the URI's authority or
//! the `Host` header) and path, and with
//! [`scope_by`](IdempotencyLayer::scope_by) by the caller (a header such as
//! `authorization`; given again, by each header given, e.g. `authorization` and an
//! account header): without it, two callers that send the same key and request get
//! the same stored answer.
//!
//! A client that balances over instances by address (tonic's `Channel::balance_list`)
//! names each instance in the request's authority: with a store shared by the
//! instances, a retry that reaches another instance is another key, and runs the
//! handler again. Such clients should address the service by one name (a DNS name
//! the balancer resolves), or the instances keep stores of their own (a retry is then
//! caught only by the instance that answered first).
//!
//! The path is the one the layer sees: under axum's `Router::nest("/v1", ..)` that is
//! the path with `/v1` taken off. One layer (one store) applied to two nested routers
//! would then take `/v1/orders` and `/v2/orders` for one endpoint: apply it to the
//! outer router, or give each nested router a layer of its own.
//!
//! The store is the [`IdempotencyStore`] trait; [`MemoryStore`] (bounded, TTL
//! eviction, one process) is the default. Behind several instances, across restarts,
//! and for the replays of deferred requests (which may come a day later and reach any
//! instance), use a shared store: `RedisStore` (feature `redis`) or one of your own.
//!
//! # Example
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use postbox::idempotency::{FingerprintedBody, IdempotencyLayer};
//! use tower::{ServiceBuilder, service_fn};
//!
//! // The layer hands the handler the body through `FingerprintedBody` (axum and tonic
//! // routers take any body; a handler written for one body type names it).
//! async fn create_order(
//!     _req: Request<FingerprintedBody<Full<Bytes>>>,
//! ) -> Result<Response<Full<Bytes>>, Infallible> {
//!     let mut res = Response::new(Full::from("order 42"));
//!     *res.status_mut() = StatusCode::CREATED;
//!     Ok(res)
//! }
//!
//! # fn main() -> Result<(), postbox::error::ConfigError> {
//! let server = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new(10_000).ttl(std::time::Duration::from_secs(3600))?)
//!     .service(service_fn(create_order));
//! // With axum: `Router::new().route(...).layer(IdempotencyLayer::new(10_000))`.
//! # fn serves<S: tower::Service<Request<Full<Bytes>>>>(_: &S) {}
//! # serves(&server);
//! # Ok(()) }
//! ```

mod fingerprint;
pub mod future;
mod layer;
#[cfg(feature = "redis")]
mod redis;
mod service;
mod store;

pub use self::fingerprint::{Fingerprint, FingerprintedBody};
pub use self::layer::IdempotencyLayer;
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;
pub use self::service::{Idempotency, REPLAYED_HEADER, StreamThrough};
pub use self::store::{Claim, ClaimToken, IdempotencyStore, MemoryStore, StoredResponse};
