//! Standard stacks from one validated config, loaded from TOML, YAML or JSON.
//!
//! [`ClientConfig`] describes the client stack of the [crate docs](crate#the-layer-order)
//! and [`ServerConfig`] the server stack; [`StackConfig`] holds both (`[client]`,
//! `[server]`). Each builds its layers in the right order:
//!
//! | stack | built by | order, outer to inner |
//! |---|---|---|
//! | client | [`ClientConfig::layer`] → [`ClientLayer`] | deadline → body buffer → retry (+ budget) → bulkhead (per authority) → circuit breaker (per authority) → attempt timeout |
//! | client that defers | [`ClientConfig::deferring_layer`] → [`DeferringClientLayer`] | enqueue fallback → the client stack |
//! | server | [`ServerConfig::layer`] → [`ServerLayer`] | errors as responses → deadline → idempotency → bulkhead (fail fast) |
//!
//! The stacks only compose the layers of this crate; each of them still works alone in
//! any `tower::ServiceBuilder`. The composed service types are nameable
//! ([`Client<S>`], [`DeferringClient<S, Q>`], [`Server<S>`]): nothing is boxed, no call
//! allocates more than its layers do on their own. (A `BoxCloneSyncService` would have
//! shortened the types at the price of an allocation and a dynamic call per request; the
//! aliases keep them short enough to write in an axum state or a struct field.) The
//! stacks live here, beside their configuration, because a stack *is* a validated
//! configuration turned into layers: building one by hand is the
//! `ServiceBuilder` of the [crate docs](crate#a-client-stack-and-a-server-stack).
//!
//! # gRPC through the client stack
//! The client stack serves gRPC calls too (a tonic `Channel` is an HTTP service): it
//! classifies an answer whose `grpc-status` is in its headers by that status (see
//! [`HttpClassifier`](crate::classify::HttpClassifier)), so an `UNAVAILABLE` under
//! `200 OK` is a failure for the retry and the breaker. Put
//! `postbox::grpc::GrpcStatusLayer` (feature `grpc`) between the stack and the channel
//! so a status sent in the trailers is seen as well; gRPC calls are `POST`s, so they
//! are retried only when `retry.idempotent_grpc_methods` names them
//! (`["/shop.Catalog/*"]`), with `retry.retry_unsafe_methods`, or with an
//! `Idempotency-Key` (any call is retried after a failure that certainly had no
//! effect: a refused connection, an open breaker), and
//! `stream_through` names the streaming methods whose bodies must not be buffered.
//!
//! # Validation across layers
//! Each layer validates its own settings; [`ClientConfig::validate`] and
//! [`ServerConfig::validate`] also check that the layers fit together (the checks of
//! Microsoft.Extensions.Http.Resilience, and one more), and the [`ConfigError`] names
//! the offending fields:
//!
//! | check | field in the error |
//! |---|---|
//! | `attempt_timeout ≤ deadline` | `client.attempt_timeout` |
//! | a time window of the breaker spans at least `2 × attempt_timeout` (a count window has no duration and is not checked) | `client.circuit_breaker.window.duration` |
//! | the breaker's `max_wait_in_half_open ≥ attempt_timeout` (else a probe that takes its whole attempt reopens the breaker before it answers) | `client.circuit_breaker.max_wait_in_half_open` |
//! | the breaker's `slow_call_duration < attempt_timeout` (the breaker sits outside the attempt's timeout, so a call is never slower than that) | `client.circuit_breaker.slow_call_duration` |
//! | the longest the backoff can wait across `retry.max_retries` retries (each delay at its cap, with any jitter: `100ms, 200ms, 400ms` for three exponential retries from `100ms`; a server's `Retry-After` is not counted) `≤ deadline` | `client.retry.backoff.max_delay` |
//! | a client bulkhead that lets callers wait (`max_waiting > 0`) sets `max_wait ≤ deadline` (it waits within the deadline, which would cut a longer wait short) | `client.bulkhead.max_wait` |
//! | `enqueue.sync_methods` are HTTP methods in upper case (methods are case-sensitive: `"get"` would keep no `GET` synchronous) | `client.enqueue.sync_methods` |
//! | `enqueue.sync_routes` are paths: each starts with `/` and has no query or fragment (`"payments"` would keep nothing synchronous, `""` every route) | `client.enqueue.sync_routes` |
//! | a bulkhead's `max_wait` is set only with `max_waiting > 0` (it bounds nothing otherwise) | `client.bulkhead.max_wait`, `server.bulkhead.max_wait` |
//! | `preset` names a preset of its section (so a rendered config loads back) | `client.preset`, `server.preset` |
//! | the server's `idempotency.lock_for ≥ deadline` (a claim outlives the handler) | `server.idempotency.lock_for` |
//! | with `enqueue.enabled`, a replay's whole call fits in its lease: `deadline ≤ replay.lease_for` less a tenth of it and `replay.ack_interval` (a replay is cut off then); the `replay` section is checked only then | `client.replay.lease_for` |
//! | with `enqueue.enabled`, `enqueue.ttl > deadline` (expiry counts from the request's arrival: a call failing at its deadline would have expired before it could be deferred) | `client.enqueue.ttl` |
//! | the server's bulkhead fails fast (`max_waiting = 0`) | `server.bulkhead.max_waiting` |
//!
//! Two values are adjusted rather than refused: the client stack caps
//! `retry.max_retry_after` and `retry.max_open_wait` at the `deadline`, so a server
//! hint (or an open breaker's `retry_after`) longer than the whole call ends the
//! retries at once instead of waiting for the deadline. And `retry.max_open_wait`,
//! unset, is `max_retry_after` in [`ClientConfig::layer`]'s stack but zero in
//! [`ClientConfig::deferring_layer`]'s: a call an open breaker rejects is deferred
//! (`circuit-open`) at once, its caller not held for the break — and one the fallback
//! keeps synchronous (a `GET`, a `sync_routes` route, a gRPC call) gets the rejection
//! at once (a `503` with `Retry-After`) instead of waiting to be a probe.
//!
//! # Config files
//! Every section is optional and every field has a default (but inside a breaker's
//! `window` given without a preset to merge with: its `type` and `size`, or `type`,
//! `duration` and `buckets`); unknown fields are errors.
//! Durations are strings with a unit ([`duration::parse`]: `"250ms"`, `"2s"`, `"1m"`).
//! A section may start from a **preset** and override any field:
//! `preset = "standard_http_client"` for a client, `preset = "server"` for a server.
//! Tables merge field by field; arrays and values replace; a table whose `type`
//! changes (the breaker's window) is replaced whole.
//!
//! [`StackConfig::load`] reads a file (the format from its extension);
//! [`StackConfig::from_str`] reads text; `Display` prints the effective configuration
//! (presets applied, defaults filled in) as TOML that reads back to the same value. A [`LoadError`] says where the problem is:
//! the line and the field for a syntax error, an unknown field or a bad value
//! (`"250 parsecs"`), the field (and its line, when the file sets it) for a
//! validation error.
//!
//! ```toml
//! [client]
//! preset = "standard_http_client"
//! deadline = "3s"
//! attempt_timeout = "500ms"
//!
//! [client.retry]
//! max_retries = 2
//! backoff = { max_delay = "1s" } # the backoff's waits must fit in the deadline
//!
//! [server]
//! preset = "server"
//!
//! [server.bulkhead]
//! max_concurrent = 64
//! ```
//!
//! The presets in full:
//!
//! ```toml
#![doc = include_str!("presets/standard_http_client.toml")]
//! ```
//!
//! ```toml
#![doc = include_str!("presets/server.toml")]
//! ```
//!
//! # Example
//! ```
//! use postbox::config::{Format, StackConfig};
//! use postbox::http::reqwest::ReqwestService;
//! use tower::ServiceBuilder;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = StackConfig::from_str(r#"
//!     [client]
//!     preset = "standard_http_client"
//!     attempt_timeout = "500ms"
//!     [client.retry]
//!     max_retries = 2
//! "#, Format::Toml)?;
//! assert_eq!(config.client.retry.max_retries, 2);
//! assert_eq!(config.client.deadline, std::time::Duration::from_secs(10)); // from the preset
//!
//! let client = ServiceBuilder::new()
//!     .layer(config.client.layer()?)
//!     .service(ReqwestService::new(reqwest::Client::new()));
//! # let _ = client;
//!
//! // The same attempt timeout above the deadline is refused, naming both fields.
//! let err = StackConfig::from_str(r#"
//!     [client]
//!     deadline = "1s"
//!     attempt_timeout = "2s"
//! "#, Format::Toml).unwrap_err();
//! assert_eq!(err.field(), Some("client.attempt_timeout"));
//! assert_eq!(err.line(), Some(4));
//! # Ok(()) }
//! ```

pub use crate::duration;
mod load;
mod render;
mod stack;

pub use self::load::{Format, LoadError};
pub use self::stack::{
    Client, ClientLayer, DeferringClient, DeferringClientLayer, HttpRetryPolicy, Server,
    ServerLayer,
};

use crate::circuit_breaker::{CircuitBreakerConfig, WindowConfig};
use crate::error::ConfigError;
use crate::retry::RetryConfig;
use serde::Deserialize;
use std::time::Duration;

/// The names of the presets, with the section they apply to.
pub const PRESETS: &[(&str, &str)] = &[("standard_http_client", "client"), ("server", "server")];

const STANDARD_HTTP_CLIENT: &str = include_str!("presets/standard_http_client.toml");
const SERVER: &str = include_str!("presets/server.toml");

/// A whole config file: a `client` and a `server` section, both optional.
///
/// # Example
/// ```
/// use postbox::config::{Format, StackConfig};
///
/// let json = r#"{ "server": { "preset": "server", "deadline": "2s" } }"#;
/// let config = StackConfig::from_str(json, Format::Json).unwrap();
/// assert_eq!(config.server.deadline, std::time::Duration::from_secs(2));
/// assert_eq!(config.server.bulkhead.max_concurrent, 256); // from the preset
/// ```
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct StackConfig {
    /// The client stack.
    pub client: ClientConfig,
    /// The server stack.
    pub server: ServerConfig,
}

/// The client stack: deadline, retry, circuit breaker and bulkhead per authority, attempt
/// timeout and, optionally, the enqueue fallback.
///
/// Defaults (an empty section) are each layer's own defaults with a 30 s deadline and a
/// 10 s attempt timeout (those of Microsoft.Extensions.Http.Resilience); the preset
/// `standard_http_client` is tighter (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The preset this section started from, if any. Presets are applied by the
    /// loader ([`StackConfig::from_str`], [`load`](StackConfig::load),
    /// [`preset`](Self::preset)): read through serde alone, a config naming one is an
    /// error (its preset would be ignored).
    #[serde(default, deserialize_with = "load::preset_name")]
    pub preset: Option<String>,
    /// One budget for every attempt and the backoff between them, propagated to the
    /// next hop.
    #[serde(deserialize_with = "duration::required")]
    pub deadline: Duration,
    /// The limit of one attempt.
    #[serde(deserialize_with = "duration::required")]
    pub attempt_timeout: Duration,
    /// Request bodies up to this many bytes are buffered so a retry can send them again;
    /// larger ones are sent once. A body the enqueue fallback
    /// ([`deferring_layer`](Self::deferring_layer)) collected to defer it (up to
    /// `enqueue.max_body`), and a replayed one, is held whole already and kept for
    /// retries whatever this limit.
    pub buffer_body: usize,
    /// gRPC methods whose request bodies are never buffered: sent at once, streaming,
    /// and so never retried (default none). Name every client-streaming and
    /// bidirectional method; see
    /// [`BufferBodyLayer::stream_through`](crate::http::body::BufferBodyLayer::stream_through).
    pub stream_through: Vec<String>,
    /// The retry layer.
    pub retry: RetryConfig,
    /// The circuit breaker of each authority.
    pub circuit_breaker: CircuitBreakerConfig,
    /// How many per-authority breakers are kept.
    pub breaker_keys: BreakerKeysConfig,
    /// The bulkhead.
    pub bulkhead: BulkheadConfig,
    /// The enqueue fallback ([`ClientConfig::deferring_layer`]).
    pub enqueue: EnqueueSection,
    /// The replayer that delivers deferred requests ([`ClientConfig::replayer`]).
    pub replay: ReplaySection,
    /// Status overrides of the classifier every layer of the stack asks.
    pub classify: ClassifySection,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            preset: None,
            deadline: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
            buffer_body: 64 * 1024,
            stream_through: Vec::new(),
            retry: RetryConfig::default(),
            circuit_breaker: CircuitBreakerConfig::default(),
            breaker_keys: BreakerKeysConfig::default(),
            bulkhead: BulkheadConfig::default(),
            enqueue: EnqueueSection::default(),
            replay: ReplaySection::default(),
            classify: ClassifySection::default(),
        }
    }
}

/// Status overrides of the [`HttpClassifier`](crate::classify::HttpClassifier) that the
/// client stack's retry, breakers and enqueue fallback share (they agree on what a
/// failure is), and the replayer's judge ([`ClientConfig::replayer`]). Statuses not
/// listed keep the defaults (see the classifier's table). Only 300–599 can be listed,
/// and not `408`, `429` or `503` as retryable failures: they are retryable already
/// (a `429` or `503` with its `Retry-After` as the hint).
///
/// ```toml
/// [client.classify]
/// retryable_failure = [409]   # this dependency answers 409 while a lock is held
/// failure = [501]             # counted by the breaker, never retried
/// success = [404]             # an answer, not a failure (the default for a 4xx)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ClassifySection {
    /// Statuses that are failures worth a retry (and a deferral; retried only when
    /// the request is retry-safe, as a `5xx` is). A listed `409` waits for its
    /// `Retry-After` if it has one; any other listed status waits its backoff only
    /// (its `Retry-After` is not read). (Listing `409` makes the idempotency layer's
    /// "request in progress" a failure the breaker counts, too.)
    pub retryable_failure: Vec<u16>,
    /// Statuses that are failures, counted by the breaker, not retried.
    pub failure: Vec<u16>,
    /// Statuses that are successes: neither counted as failures nor retried.
    pub success: Vec<u16>,
}

impl ClassifySection {
    /// The classifier these overrides make.
    pub fn to_classifier(&self) -> crate::classify::HttpClassifier {
        use crate::classify::Classification;
        let lists = [
            (&self.retryable_failure, Classification::failure()),
            (
                &self.failure,
                Classification::failure().with_retryable(false),
            ),
            (&self.success, Classification::success()),
        ];
        let mut c = crate::classify::HttpClassifier::new();
        for (codes, class) in lists {
            for &code in codes {
                c = c.with_range(code..=code, class);
            }
        }
        c
    }

    fn validate(&self, f: impl Fn(&str) -> String) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashMap::new();
        for (name, codes) in [
            ("classify.retryable_failure", &self.retryable_failure),
            ("classify.failure", &self.failure),
            ("classify.success", &self.success),
        ] {
            for &code in codes {
                if !(300..=599).contains(&code) {
                    return Err(ConfigError::new(
                        f(name),
                        format!(
                            "({code}) must be a status from 300 to 599 (a 1xx or 2xx is an \
                             answer, and a gRPC status rides on a 200)"
                        ),
                    ));
                }
                if name == "classify.retryable_failure" && matches!(code, 408 | 429 | 503) {
                    return Err(ConfigError::new(
                        f(name),
                        format!(
                            "({code}) is a retryable failure already (a 429 or 503 also \
                             gives its `Retry-After` as an overload's hint, which listing \
                             it would lose)"
                        ),
                    ));
                }
                if let Some(first) = seen.insert(code, name)
                    && first != name
                {
                    return Err(ConfigError::new(
                        f(name),
                        format!("({code}) is listed in `{}` too", f(first)),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The bound on per-authority breakers of [`ClientConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct BreakerKeysConfig {
    /// At most this many breakers (default 1024).
    pub max_keys: usize,
    /// A breaker idle this long may be dropped when room is needed (default 5 min).
    #[serde(deserialize_with = "duration::required")]
    pub idle_timeout: Duration,
}

impl Default for BreakerKeysConfig {
    fn default() -> Self {
        Self {
            max_keys: 1024,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// A bulkhead (see [`BulkheadLayer::builder`](crate::bulkhead::BulkheadLayer::builder)):
/// in the client stack one per authority (these limits for each host), in the server
/// stack one for the whole service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct BulkheadConfig {
    /// At most this many calls in flight (default 100).
    pub max_concurrent: usize,
    /// At most this many callers waiting (default 0: fail fast).
    pub max_waiting: usize,
    /// How long a caller waits, when waiting is allowed.
    #[serde(deserialize_with = "duration::option")]
    pub max_wait: Option<Duration>,
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 100,
            max_waiting: 0,
            max_wait: None,
        }
    }
}

impl BulkheadConfig {
    /// Validates and builds the layer.
    ///
    /// # Errors
    /// As [`BulkheadBuilder::build`](crate::bulkhead::BulkheadBuilder::build).
    pub fn build(&self) -> Result<crate::bulkhead::BulkheadLayer, ConfigError> {
        self.builder().build()
    }

    /// The builder these values make.
    pub fn builder(&self) -> crate::bulkhead::BulkheadBuilder {
        let b = crate::bulkhead::BulkheadLayer::builder()
            .max_concurrent(self.max_concurrent)
            .max_waiting(self.max_waiting);
        match self.max_wait {
            Some(d) => b.max_wait(d),
            None => b,
        }
    }
}

/// The replayer of [`ClientConfig`]: how the deferred requests are delivered (see
/// [`Replayer`](crate::enqueue::Replayer), whose builder methods these fields name,
/// with the same defaults).
///
/// ```
/// use postbox::config::{ClientConfig, Format};
///
/// # fn main() -> Result<(), postbox::config::LoadError> {
/// let config = ClientConfig::from_str(
///     "[replay]\nconcurrency = 4\nmax_attempts = 20\nbackoff_max = \"10m\"\n",
///     Format::Toml,
/// )?;
/// assert_eq!(config.replay.concurrency, 4);
/// // Then: config.replayer(Replayer::http(queue, inner))?.spawn()?
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ReplaySection {
    /// At most this many replays in flight (default 16).
    pub concurrency: usize,
    /// Lease at most this many messages at a time (default 64).
    pub lease_batch: usize,
    /// How long a lease lasts (default 60 s); a replay is cut off a tenth of it plus
    /// `ack_interval` before it ends.
    #[serde(deserialize_with = "duration::required")]
    pub lease_for: Duration,
    /// How often an idle replayer looks for due messages (default 1 s).
    #[serde(deserialize_with = "duration::required")]
    pub poll_interval: Duration,
    /// A message is dead-lettered after this many deliveries that did not succeed
    /// (default 10).
    pub max_attempts: u32,
    /// The backoff after a retryable failure starts here (default 1 s) …
    #[serde(deserialize_with = "duration::required")]
    pub backoff_base: Duration,
    /// … and doubles up to this (default 5 min).
    #[serde(deserialize_with = "duration::required")]
    pub backoff_max: Duration,
    /// A dependency's hint is honoured up to this (default 1 h; `"0s"` ignores hints).
    #[serde(deserialize_with = "duration::required")]
    pub max_retry_after: Duration,
    /// Whether the backoff is jittered (default `true`).
    pub jitter: bool,
    /// Ack in batches of up to this many (default 64) …
    pub ack_batch: usize,
    /// … flushed at least this often (default 100 ms; at most half of `lease_for`).
    #[serde(deserialize_with = "duration::required")]
    pub ack_interval: Duration,
    /// On shutdown, wait this long (default 10 s) for replays in flight, and for acks,
    /// retries, releases and dead letters the queue refused (tried again every
    /// `poll_interval`).
    #[serde(deserialize_with = "duration::required")]
    pub grace: Duration,
}

impl Default for ReplaySection {
    fn default() -> Self {
        Self::from_config(&crate::enqueue::replay::ReplayConfig::default())
    }
}

impl ReplaySection {
    fn from_config(c: &crate::enqueue::replay::ReplayConfig) -> Self {
        Self {
            concurrency: c.concurrency,
            lease_batch: c.lease_batch,
            lease_for: c.lease_for,
            poll_interval: c.poll_interval,
            max_attempts: c.max_attempts,
            backoff_base: c.backoff_base,
            backoff_max: c.backoff_max,
            max_retry_after: c.max_retry_after,
            jitter: c.jitter,
            ack_batch: c.ack_batch,
            ack_interval: c.ack_interval,
            grace: c.grace,
        }
    }

    fn to_config(&self) -> crate::enqueue::replay::ReplayConfig {
        crate::enqueue::replay::ReplayConfig {
            concurrency: self.concurrency,
            lease_batch: self.lease_batch,
            lease_for: self.lease_for,
            poll_interval: self.poll_interval,
            max_attempts: self.max_attempts,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            max_retry_after: self.max_retry_after,
            jitter: self.jitter,
            ack_batch: self.ack_batch,
            ack_interval: self.ack_interval,
            grace: self.grace,
            seed: None,
        }
    }
}

impl ClientConfig {
    /// `replayer` set up as this configuration says: every setting of the
    /// `[client.replay]` section (a seed, if set, stays), and judged with the stack's
    /// classifier (`[client.classify]`), so that a status the fallback deferred as a
    /// retryable failure is retried on replay, not dead-lettered.
    ///
    /// # Errors
    /// An invalid `[client.replay]` setting, or a lease too short for the `deadline`
    /// (checked here whether or not this process defers: a process may only replay).
    pub fn replayer<Q, S, K, J>(
        &self,
        replayer: crate::enqueue::Replayer<Q, S, K, J>,
    ) -> Result<crate::enqueue::Replayer<Q, S, K, crate::enqueue::HttpJudge>, ConfigError> {
        self.validate_replay("client", |name| format!("client.{name}"))?;
        Ok(replayer.with_config(self.replay.to_config()).with_judge(
            crate::enqueue::HttpJudge::with_classifier(self.classify.to_classifier()),
        ))
    }
}

/// The enqueue fallback of [`ClientConfig`] (see [`EnqueueConfig`](crate::enqueue::EnqueueConfig)).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct EnqueueSection {
    /// `true` lets [`ClientConfig::deferring_layer`] build the fallback (default `false`).
    pub enabled: bool,
    /// Request bodies up to this many bytes may be deferred (default 64 KiB).
    pub max_body: usize,
    /// A stored message expires this long after the request (default 24 h; `"off"`:
    /// never, see [`EnqueueConfig::no_expiry`](crate::enqueue::EnqueueConfig::no_expiry)).
    #[serde(deserialize_with = "duration::or_off")]
    pub ttl: Option<Duration>,
    /// A dependency's `Retry-After` delays a deferred request's first delivery at most
    /// this long (default 1 h; see
    /// [`EnqueueConfig::max_retry_after`](crate::enqueue::EnqueueConfig::max_retry_after)).
    /// The waits between replays are capped by the [`Replayer`](crate::enqueue::Replayer)'s
    /// own `max_retry_after`, set where it is built.
    #[serde(deserialize_with = "duration::required")]
    pub max_retry_after: Duration,
    /// Methods that stay synchronous (default `GET`, `HEAD`, `OPTIONS`, `TRACE`; a
    /// `CONNECT` or an `Upgrade` request is never deferred).
    pub sync_methods: Vec<String>,
    /// Routes that stay synchronous, with everything below them, by whole path segments
    /// (default none; see [`DeferPolicy::keep_sync_route`](crate::enqueue::DeferPolicy::keep_sync_route)).
    pub sync_routes: Vec<String>,
}

impl Default for EnqueueSection {
    fn default() -> Self {
        Self {
            enabled: false,
            max_body: 64 * 1024,
            ttl: Some(Duration::from_secs(24 * 60 * 60)),
            max_retry_after: crate::enqueue::DEFAULT_MAX_RETRY_AFTER,
            sync_methods: vec![
                "GET".into(),
                "HEAD".into(),
                "OPTIONS".into(),
                "TRACE".into(),
            ],
            sync_routes: Vec::new(),
        }
    }
}

impl EnqueueSection {
    /// The [`EnqueueConfig`](crate::enqueue::EnqueueConfig) this describes.
    pub fn to_enqueue_config(&self) -> crate::enqueue::EnqueueConfig {
        let mut policy = crate::enqueue::DeferPolicy::defer_all();
        for m in &self.sync_methods {
            policy = policy.keep_sync_method(m.clone());
        }
        for r in &self.sync_routes {
            policy = policy.keep_sync_route(r.clone());
        }
        let config = crate::enqueue::EnqueueConfig::new()
            .policy(policy)
            .max_body(self.max_body)
            .max_retry_after(self.max_retry_after);
        match self.ttl {
            Some(ttl) => config.ttl(ttl),
            None => config.no_expiry(),
        }
    }
}

/// The server stack, outer to inner: errors answered as responses, the deadline (the
/// caller's, if sooner), idempotency, and a fail-fast bulkhead.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The preset this section started from, if any. Presets are applied by the
    /// loader ([`StackConfig::from_str`], [`load`](StackConfig::load),
    /// [`preset`](Self::preset)): read through serde alone, a config naming one is an
    /// error (its preset would be ignored).
    #[serde(default, deserialize_with = "load::preset_name")]
    pub preset: Option<String>,
    /// The longest a request may take (default 5 s).
    #[serde(deserialize_with = "duration::required")]
    pub deadline: Duration,
    /// Also honour a sooner deadline sent by the caller (`grpc-timeout`,
    /// `postbox-timeout-ms`; default `true`).
    pub honour_inbound_deadline: bool,
    /// The bulkhead (fail fast: `max_waiting` must be 0); default 256 in flight, also
    /// when the table is given without `max_concurrent`.
    #[serde(deserialize_with = "server_bulkhead")]
    pub bulkhead: BulkheadConfig,
    /// The idempotency layer.
    pub idempotency: IdempotencySection,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            preset: None,
            deadline: Duration::from_secs(5),
            honour_inbound_deadline: true,
            bulkhead: BulkheadConfig {
                max_concurrent: 256,
                ..BulkheadConfig::default()
            },
            idempotency: IdempotencySection::default(),
        }
    }
}

/// `[server.bulkhead]`: a field the table leaves out takes the server's default
/// ([`ServerConfig::default`], 256 in flight), not the client bulkhead's 100.
fn server_bulkhead<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BulkheadConfig, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Partial {
        max_concurrent: Option<usize>,
        max_waiting: Option<usize>,
        #[serde(default, deserialize_with = "duration::option")]
        max_wait: Option<Duration>,
    }
    let p = Partial::deserialize(d)?;
    let base = ServerConfig::default().bulkhead;
    Ok(BulkheadConfig {
        max_concurrent: p.max_concurrent.unwrap_or(base.max_concurrent),
        max_waiting: p.max_waiting.unwrap_or(base.max_waiting),
        max_wait: p.max_wait.or(base.max_wait),
    })
}

/// The idempotency layer of [`ServerConfig`] (see
/// [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer)).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct IdempotencySection {
    /// Responses remembered in memory (default 10 000; claims in progress come on top).
    /// Not used with a store of your own
    /// ([`layer_with_store`](ServerConfig::layer_with_store)).
    pub capacity: usize,
    /// How long a response is remembered (default 25 h: an hour past the 24 h a
    /// deferred request may wait in a client's queue, so a replay started just before
    /// its message expires still finds the key).
    #[serde(deserialize_with = "duration::required")]
    pub ttl: Duration,
    /// How long a claim lasts (default 60 s); at least the deadline.
    #[serde(deserialize_with = "duration::required")]
    pub lock_for: Duration,
    /// Response bodies up to this many bytes are remembered (default 1 MiB).
    pub max_body: usize,
    /// A header whose value scopes the keys by caller, e.g. `"authorization"` (default
    /// none); see [`IdempotencyLayer::scope_by`](crate::idempotency::IdempotencyLayer::scope_by).
    pub scope_by: Option<String>,
    /// gRPC methods whose calls pass through as if they had no key: every
    /// server-streaming and bidirectional one (default none); see
    /// [`IdempotencyLayer::stream_through`](crate::idempotency::IdempotencyLayer::stream_through).
    pub stream_through: Vec<String>,
    /// Refuse (`400`) a request of an unsafe method without a usable key (default
    /// `false`); see [`IdempotencyLayer::require_key`](crate::idempotency::IdempotencyLayer::require_key).
    pub require_key: bool,
}

impl Default for IdempotencySection {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            ttl: Duration::from_secs(25 * 60 * 60),
            lock_for: Duration::from_secs(60),
            max_body: 1024 * 1024,
            scope_by: None,
            stream_through: Vec::new(),
            require_key: false,
        }
    }
}

fn prefixed(prefix: &str, e: ConfigError) -> ConfigError {
    if prefix.is_empty() {
        return e;
    }
    ConfigError::new(format!("{prefix}.{}", e.field()), e.message().to_owned())
}

/// Each of `patterns` names gRPC methods (the `stream_through` lists): one that would
/// match every call or none is an error naming the entry, `field[i]`.
fn method_patterns(patterns: &[String], field: &str) -> Result<(), ConfigError> {
    for (i, m) in patterns.iter().enumerate() {
        crate::http::check_method_pattern(format!("{field}[{i}]"), m)?;
    }
    Ok(())
}

fn positive(field: String, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(field, "must be greater than zero"));
    }
    Ok(())
}

/// A count must fit a config file's integers (TOML's are 64-bit signed): a larger one
/// could not be written to a file and read back.
fn storable(field: String, n: usize) -> Result<(), ConfigError> {
    if i64::try_from(n).is_err() {
        return Err(ConfigError::new(
            field,
            format!(
                "({n}) must be at most {} (a config file's largest integer)",
                i64::MAX
            ),
        ));
    }
    Ok(())
}

fn fmt_d(d: Duration) -> String {
    duration::format(d)
}

// === impl StackConfig ===

impl StackConfig {
    /// Validates both sections, their fields named `client.…` and `server.…`.
    ///
    /// # Errors
    /// The first invalid field (see [`ClientConfig::validate`], [`ServerConfig::validate`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.client.validate_at("client")?;
        self.server.validate_at("server")
    }
}

// === impl ClientConfig ===

impl ClientConfig {
    /// The preset `standard_http_client` (see the [module docs](self)).
    pub fn standard_http_client() -> Self {
        Self::preset("standard_http_client").expect("the shipped preset is valid")
    }

    /// The client preset called `name`.
    ///
    /// # Errors
    /// An unknown name (the field is `preset`).
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let text = format!("preset = {name:?}");
        Self::from_str(&text, Format::Toml).map_err(|e| match e.config_error() {
            Some(c) => c.clone(),
            None => ConfigError::new("preset", e.to_string()),
        })
    }

    /// Validates every layer and how they fit together (fields named `client.…`).
    ///
    /// # Errors
    /// The first invalid field; see the [module docs](self#validation-across-layers).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_at("client")
    }

    /// The replayer's settings, alone and against the deadline (only a stack that
    /// defers has a replayer); `f` names a field under `p`.
    fn validate_replay(&self, p: &str, f: impl Fn(&str) -> String) -> Result<(), ConfigError> {
        let replay = self.replay.to_config();
        replay.validate().map_err(|e| {
            // The replayer names its backoff `replay.backoff`; the file has two fields.
            let e = match e.field() {
                "replay.backoff" => ConfigError::new("replay.backoff_base", e.message().to_owned()),
                _ => e,
            };
            prefixed(p, e)
        })?;
        if self.deadline > replay.replay_limit() {
            return Err(ConfigError::new(
                f("replay.lease_for"),
                format!(
                    "({}) must leave room for a whole call: a replay is cut off {} into \
                     its lease (a tenth of it and `ack_interval` before its end), before \
                     `{}` ({}) would end it",
                    fmt_d(self.replay.lease_for),
                    fmt_d(replay.replay_limit()),
                    f("deadline"),
                    fmt_d(self.deadline)
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn validate_at(&self, p: &str) -> Result<(), ConfigError> {
        let f = |name: &str| {
            if p.is_empty() {
                name.to_owned()
            } else {
                format!("{p}.{name}")
            }
        };
        positive(f("deadline"), self.deadline)?;
        positive(f("attempt_timeout"), self.attempt_timeout)?;
        storable(f("buffer_body"), self.buffer_body)?;
        method_patterns(&self.stream_through, &f("stream_through"))?;
        self.retry
            .check_grpc_methods()
            .map_err(|e| prefixed(p, e))?;
        storable(f("breaker_keys.max_keys"), self.breaker_keys.max_keys)?;
        storable(f("bulkhead.max_waiting"), self.bulkhead.max_waiting)?;
        storable(f("enqueue.max_body"), self.enqueue.max_body)?;
        // Rendered even with the fallback off: each must read back.
        storable(f("replay.concurrency"), self.replay.concurrency)?;
        storable(f("replay.lease_batch"), self.replay.lease_batch)?;
        storable(f("replay.ack_batch"), self.replay.ack_batch)?;
        // Checked even where unused (a constant backoff's factor, a disabled budget's
        // ratio): a NaN cannot be written to a config file and read back.
        let b = &self.circuit_breaker;
        for (name, x) in [
            ("retry.backoff.factor", self.retry.backoff.factor),
            ("retry.budget.ratio", self.retry.budget.ratio),
            (
                "circuit_breaker.failure_rate_threshold",
                b.failure_rate_threshold,
            ),
            (
                "circuit_breaker.slow_call_rate_threshold",
                b.slow_call_rate_threshold,
            ),
            ("circuit_breaker.break_multiplier", b.break_multiplier),
            ("circuit_breaker.break_jitter", b.break_jitter),
        ] {
            if !x.is_finite() {
                return Err(ConfigError::new(
                    f(name),
                    format!("({x}) must be a finite number"),
                ));
            }
        }
        // Built, not only applied: `build` has checks of its own (`max_retry_after`).
        self.retry
            .apply(crate::retry::RetryLayer::builder())
            .and_then(crate::retry::RetryBuilder::build)
            .map_err(|e| prefixed(p, e))?;
        self.circuit_breaker
            .check_mode()
            .map_err(|e| prefixed(p, e))?;
        self.circuit_breaker
            .builder()
            .keyed_by_authority()
            .max_keys(self.breaker_keys.max_keys)
            .idle_timeout(self.breaker_keys.idle_timeout)
            .build()
            .map_err(|e| {
                // The keyed builder names its own fields `circuit_breaker.*`.
                let e = match e.field() {
                    "circuit_breaker.max_keys" => {
                        ConfigError::new("breaker_keys.max_keys", e.message().to_owned())
                    }
                    "circuit_breaker.idle_timeout" => {
                        ConfigError::new("breaker_keys.idle_timeout", e.message().to_owned())
                    }
                    _ => e,
                };
                prefixed(p, e)
            })?;
        // As the stack builds it (a keyed bulkhead refuses what a plain one allows).
        self.bulkhead
            .builder()
            .keyed_by_authority()
            .map_err(|e| prefixed(p, e))?;
        if self.enqueue.enabled {
            self.enqueue
                .to_enqueue_config()
                .validate()
                .map_err(|e| prefixed(p, e))?;
        }
        self.classify.validate(f)?;
        if self.enqueue.enabled {
            self.validate_replay(p, f)?;
            if let Some(ttl) = self.enqueue.ttl
                && ttl <= self.deadline
            {
                // Expiry counts from when the request came: a call that ran out its
                // deadline would be expired by the time it failed, and never deferred.
                return Err(ConfigError::new(
                    f("enqueue.ttl"),
                    format!(
                        "({}) must be longer than `{}` ({}): a call that fails at its \
                         deadline would have expired before it could be deferred",
                        fmt_d(ttl),
                        f("deadline"),
                        fmt_d(self.deadline)
                    ),
                ));
            }
        }

        // Across layers.
        if self.attempt_timeout > self.deadline {
            return Err(ConfigError::new(
                f("attempt_timeout"),
                format!(
                    "({}) must be at most `{}` ({}): one attempt cannot outlast the whole call",
                    fmt_d(self.attempt_timeout),
                    f("deadline"),
                    fmt_d(self.deadline)
                ),
            ));
        }
        if self.circuit_breaker.consecutive_failures.is_none()
            && let WindowConfig::Time { duration, .. } = self.circuit_breaker.window
            && duration < self.attempt_timeout.saturating_mul(2)
        {
            return Err(ConfigError::new(
                f("circuit_breaker.window.duration"),
                format!(
                    "({}) must be at least 2 × `{}` ({}): a window shorter than two \
                     attempts judges the breaker on too few outcomes",
                    fmt_d(duration),
                    f("attempt_timeout"),
                    fmt_d(self.attempt_timeout.saturating_mul(2))
                ),
            ));
        }
        if let Some(wait) = self.circuit_breaker.max_wait_in_half_open
            && wait < self.attempt_timeout
        {
            return Err(ConfigError::new(
                f("circuit_breaker.max_wait_in_half_open"),
                format!(
                    "({}) must be at least `{}` ({}) or \"off\": a probe may take its whole \
                     attempt, and the breaker would reopen before it answers (the wait \
                     counts from the newest probe's admission)",
                    fmt_d(wait),
                    f("attempt_timeout"),
                    fmt_d(self.attempt_timeout)
                ),
            ));
        }
        if let Some(slow) = self.circuit_breaker.slow_call_duration
            && slow >= self.attempt_timeout
        {
            return Err(ConfigError::new(
                f("circuit_breaker.slow_call_duration"),
                format!(
                    "({}) must be below `{}` ({}): an attempt is cut off then, so no call \
                     would ever count as slow",
                    fmt_d(slow),
                    f("attempt_timeout"),
                    fmt_d(self.attempt_timeout)
                ),
            ));
        }
        if self.bulkhead.max_waiting > 0 && self.bulkhead.max_wait.is_none_or(|w| w > self.deadline)
        {
            // The stack readies the bulkhead inside the deadline's future (`BufferBody`
            // readies what it wraps once the body is read): the deadline's timer runs
            // while a caller waits for a slot, and would cut a longer wait short.
            return Err(ConfigError::new(
                f("bulkhead.max_wait"),
                format!(
                    "({}) must be set and at most `{}` ({}) when `{}` > 0: a caller \
                     waits for a slot within the deadline, which would cut a longer \
                     wait short",
                    self.bulkhead.max_wait.map_or("unset".to_owned(), fmt_d),
                    f("deadline"),
                    fmt_d(self.deadline),
                    f("bulkhead.max_waiting"),
                ),
            ));
        }
        // Any method token (`M-SEARCH`, `M_SEARCH`, `PURGE2`), in upper case.
        if let Some(m) = self
            .enqueue
            .sync_methods
            .iter()
            .find(|m| http::Method::from_bytes(m.as_bytes()).is_err())
        {
            return Err(ConfigError::new(
                f("enqueue.sync_methods"),
                format!("{m:?} is not an HTTP method"),
            ));
        }
        if let Some(m) = self
            .enqueue
            .sync_methods
            .iter()
            .find(|m| m.bytes().any(|b| b.is_ascii_lowercase()))
        {
            return Err(ConfigError::new(
                f("enqueue.sync_methods"),
                format!(
                    "{m:?} is not an upper-case method: methods are case-sensitive, so it \
                     would keep nothing synchronous (did you mean {:?}?)",
                    m.to_ascii_uppercase()
                ),
            ));
        }
        if let Some(r) = self
            .enqueue
            .sync_routes
            .iter()
            .find(|r| !r.starts_with('/') || r.contains(['?', '#']))
        {
            return Err(ConfigError::new(
                f("enqueue.sync_routes"),
                format!(
                    "{r:?} is not a route: a route is a path, starting with `/`, without a \
                     query or fragment (it would keep nothing synchronous, or \"\" every route)"
                ),
            ));
        }
        wait_needs_waiting(&self.bulkhead, f("bulkhead.max_wait"))?;
        known_preset(self.preset.as_deref(), "client", f("preset"))?;
        // The longest the backoff can wait across all retries (checked above to build),
        // stopping once it passes the deadline.
        let backoff = self
            .retry
            .backoff
            .to_backoff()
            .map_err(|e| prefixed(p, e))?;
        let mut waits = Duration::ZERO;
        let flat = backoff.is_flat();
        for retry in 1..=self.retry.max_retries {
            let longest = backoff.longest(retry);
            // At the cap, or not growing (constant, zero), every later retry waits as
            // long: the rest in one step, so a huge `max_retries` is no long loop. (Past
            // 100 000 retries of a schedule still growing, the same, a bound below.) Not
            // "the same as the last": a slow growth rounded to the nanosecond repeats.
            if longest == backoff.max_delay() || flat || retry > 100_000 {
                let rest = self.retry.max_retries - retry + 1;
                waits = waits.saturating_add(longest.saturating_mul(rest));
                break;
            }
            waits = waits.saturating_add(longest);
            if waits > self.deadline {
                break;
            }
        }
        if waits > self.deadline {
            return Err(ConfigError::new(
                f("retry.backoff.max_delay"),
                format!(
                    "({}) lets the backoff wait {} or more in all between the `{}` ({}) \
                     retries: more than `{}` ({}), so the retries would be cut off by the \
                     deadline",
                    fmt_d(self.retry.backoff.max_delay),
                    fmt_d(waits),
                    f("retry.max_retries"),
                    self.retry.max_retries,
                    f("deadline"),
                    fmt_d(self.deadline)
                ),
            ));
        }
        Ok(())
    }
}

/// A section's `preset`, if set, names a preset of that `kind`: a config rendered from
/// it must load back.
fn known_preset(preset: Option<&str>, kind: &str, field: String) -> Result<(), ConfigError> {
    match preset {
        Some(name) if !PRESETS.contains(&(name, kind)) => Err(ConfigError::new(
            field,
            format!("names an unknown {kind} preset `{name}`"),
        )),
        _ => Ok(()),
    }
}

/// A bulkhead's `max_wait` is set only where callers may wait (`max_waiting > 0`): it
/// would bound nothing.
fn wait_needs_waiting(b: &BulkheadConfig, field: String) -> Result<(), ConfigError> {
    if b.max_waiting == 0 && b.max_wait.is_some() {
        return Err(ConfigError::new(
            field,
            "has no effect while `max_waiting` is 0 (callers find no waiting slot and are \
             rejected at once): set `max_waiting`, or leave `max_wait` out",
        ));
    }
    Ok(())
}

// === impl ServerConfig ===

impl ServerConfig {
    /// The preset `server` (see the [module docs](self)).
    pub fn server() -> Self {
        Self::preset("server").expect("the shipped preset is valid")
    }

    /// The server preset called `name`.
    ///
    /// # Errors
    /// An unknown name (the field is `preset`).
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let text = format!("preset = {name:?}");
        Self::from_str(&text, Format::Toml).map_err(|e| match e.config_error() {
            Some(c) => c.clone(),
            None => ConfigError::new("preset", e.to_string()),
        })
    }

    /// Validates every layer and how they fit together (fields named `server.…`).
    ///
    /// # Errors
    /// The first invalid field; see the [module docs](self#validation-across-layers).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_at("server")
    }

    pub(crate) fn validate_at(&self, p: &str) -> Result<(), ConfigError> {
        let f = |name: &str| {
            if p.is_empty() {
                name.to_owned()
            } else {
                format!("{p}.{name}")
            }
        };
        positive(f("deadline"), self.deadline)?;
        storable(f("bulkhead.max_waiting"), self.bulkhead.max_waiting)?;
        storable(f("idempotency.capacity"), self.idempotency.capacity)?;
        storable(f("idempotency.max_body"), self.idempotency.max_body)?;
        // Before the bulkhead's own checks, which would ask for a `max_wait` first.
        if self.bulkhead.max_waiting != 0 {
            return Err(ConfigError::new(
                f("bulkhead.max_waiting"),
                "must be 0: the server stack fails fast (axum expects services to be ready; \
                 a quick 503 with Retry-After beats a pile-up)",
            ));
        }
        self.bulkhead.build().map_err(|e| prefixed(p, e))?;
        wait_needs_waiting(&self.bulkhead, f("bulkhead.max_wait"))?;
        known_preset(self.preset.as_deref(), "server", f("preset"))?;
        if self.idempotency.capacity == 0 {
            return Err(ConfigError::new(
                f("idempotency.capacity"),
                "must be at least 1 (to switch the layer off, leave it out of the stack)",
            ));
        }
        let store_bytes = crate::idempotency::MemoryStore::DEFAULT_MAX_BYTES;
        if self.idempotency.max_body > store_bytes {
            return Err(ConfigError::new(
                f("idempotency.max_body"),
                format!(
                    "({}) must be at most {store_bytes}, the in-memory store's byte budget: \
                     a larger response would never be remembered",
                    self.idempotency.max_body
                ),
            ));
        }
        if let Some(h) = &self.idempotency.scope_by
            && http::HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            return Err(ConfigError::new(
                f("idempotency.scope_by"),
                format!("({h:?}) is not a header name"),
            ));
        }
        method_patterns(
            &self.idempotency.stream_through,
            &f("idempotency.stream_through"),
        )?;
        positive(f("idempotency.ttl"), self.idempotency.ttl)?;
        positive(f("idempotency.lock_for"), self.idempotency.lock_for)?;
        if self.idempotency.lock_for < self.deadline {
            return Err(ConfigError::new(
                f("idempotency.lock_for"),
                format!(
                    "({}) must be at least `{}` ({}): a claim must outlive the handler, or a \
                     duplicate runs it while the first still runs",
                    fmt_d(self.idempotency.lock_for),
                    f("deadline"),
                    fmt_d(self.deadline)
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config naming a preset, read through serde alone (an application's own config
    /// struct), is an error: only the loader applies presets. (It read as the built-in
    /// defaults with the preset's name: a `standard_http_client` that was not one.) The
    /// loader still applies it, and serde still reads a config without one.
    #[test]
    fn a_preset_read_through_serde_alone_is_an_error() {
        let err = serde_json::from_str::<ClientConfig>(r#"{"preset":"standard_http_client"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("preset is applied by the loader"), "{err}");
        let err = serde_json::from_str::<StackConfig>(r#"{"server":{"preset":"server"}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("preset is applied by the loader"), "{err}");
        let plain: ClientConfig = serde_json::from_str(r#"{"deadline":"3s"}"#).unwrap();
        assert_eq!(plain.deadline, Duration::from_secs(3));
        let loaded = StackConfig::from_str(
            r#"{"client":{"preset":"standard_http_client"}}"#,
            Format::Json,
        )
        .unwrap();
        assert_eq!(loaded.client, ClientConfig::standard_http_client());
    }

    #[test]
    fn presets_and_defaults_are_valid() {
        ClientConfig::default().validate().unwrap();
        ServerConfig::default().validate().unwrap();
        StackConfig::default().validate().unwrap();
        let c = ClientConfig::standard_http_client();
        c.validate().unwrap();
        assert_eq!(c.preset.as_deref(), Some("standard_http_client"));
        assert_eq!(c.deadline, Duration::from_secs(10));
        let s = ServerConfig::server();
        s.validate().unwrap();
        assert_eq!(s.bulkhead.max_concurrent, 256);
    }

    #[test]
    fn unknown_preset_names_the_field() {
        let e = ClientConfig::preset("server").unwrap_err();
        assert_eq!(e.field(), "preset");
        assert!(e.message().contains("standard_http_client"), "{e}");
    }

    #[test]
    fn cross_layer_checks_name_the_fields() {
        let mut c = ClientConfig::standard_http_client();
        c.attempt_timeout = Duration::from_secs(11);
        assert_eq!(c.validate().unwrap_err().field(), "client.attempt_timeout");

        let mut c = ClientConfig::standard_http_client();
        c.circuit_breaker.window = WindowConfig::Time {
            duration: Duration::from_secs(3),
            buckets: 3,
        };
        assert_eq!(
            c.validate().unwrap_err().field(),
            "client.circuit_breaker.window.duration"
        );

        // The backoff's own schedule counts, not retries × cap: six retries of 100 ms
        // doubling to a 2 s cap wait at most 5.1 s, within the 10 s deadline...
        let mut c = ClientConfig::standard_http_client();
        c.retry.max_retries = 6;
        c.validate().unwrap();
        // ...ten wait up to 13.1 s.
        c.retry.max_retries = 10;
        let e = c.validate().unwrap_err();
        // However many retries, no long loop: none at a zero base, or all at the cap.
        let mut huge = ClientConfig::standard_http_client();
        huge.retry.max_retries = u32::MAX;
        huge.retry.backoff.base = Duration::ZERO;
        huge.validate().unwrap();
        huge.retry.backoff.base = Duration::from_millis(1);
        huge.retry.backoff.kind = crate::retry::BackoffKind::Constant;
        assert_eq!(
            huge.validate().unwrap_err().field(),
            "client.retry.backoff.max_delay"
        );
        assert_eq!(e.field(), "client.retry.backoff.max_delay");
        assert!(e.message().contains("client.retry.max_retries"), "{e}");
        assert!(e.message().contains("client.deadline"), "{e}");

        // A half-open limit shorter than one attempt reopens before the probe answers.
        let mut c = ClientConfig::standard_http_client();
        c.circuit_breaker.max_wait_in_half_open = Some(Duration::from_millis(1500));
        let e = c.validate().unwrap_err();
        assert_eq!(e.field(), "client.circuit_breaker.max_wait_in_half_open");
        assert!(e.message().contains("client.attempt_timeout"), "{e}");
        c.circuit_breaker.max_wait_in_half_open = None;
        c.validate().unwrap();
        c.circuit_breaker.max_wait_in_half_open = Some(c.attempt_timeout);
        c.validate().unwrap();

        // A slow-call duration no attempt can reach (it is cut off first) never trips.
        let mut c = ClientConfig::standard_http_client();
        c.circuit_breaker.slow_call_duration = Some(c.attempt_timeout);
        let e = c.validate().unwrap_err();
        assert_eq!(e.field(), "client.circuit_breaker.slow_call_duration");
        assert!(e.message().contains("client.attempt_timeout"), "{e}");
        c.circuit_breaker.slow_call_duration = Some(c.attempt_timeout - Duration::from_millis(1));
        c.validate().unwrap();

        let mut s = ServerConfig::server();
        s.idempotency.max_body = crate::idempotency::MemoryStore::DEFAULT_MAX_BYTES + 1;
        assert_eq!(
            s.validate().unwrap_err().field(),
            "server.idempotency.max_body"
        );

        let mut s = ServerConfig::server();
        s.idempotency.lock_for = Duration::from_secs(1);
        assert_eq!(
            s.validate().unwrap_err().field(),
            "server.idempotency.lock_for"
        );
    }

    /// Values that would be silently ignored, or that would not load back once
    /// rendered, are refused with their field.
    #[test]
    fn values_that_would_do_nothing_are_refused() {
        for route in ["payments", "", "/pay?x=1", "/pay#top"] {
            let mut c = ClientConfig::standard_http_client();
            c.enqueue.sync_routes = vec!["/ok".into(), route.into()];
            let e = c.validate().unwrap_err();
            assert_eq!(e.field(), "client.enqueue.sync_routes", "{route:?}");
        }
        let mut c = ClientConfig::standard_http_client();
        c.enqueue.sync_routes = vec!["/payments".into()];
        c.validate().unwrap();

        let mut c = ClientConfig::standard_http_client();
        c.bulkhead.max_wait = Some(Duration::from_millis(200));
        assert_eq!(
            c.validate().unwrap_err().field(),
            "client.bulkhead.max_wait"
        );
        c.bulkhead.max_waiting = 8;
        c.validate().unwrap();
        let mut s = ServerConfig::server();
        s.bulkhead.max_wait = Some(Duration::from_millis(200));
        assert_eq!(
            s.validate().unwrap_err().field(),
            "server.bulkhead.max_wait"
        );

        let mut c = ClientConfig::standard_http_client();
        c.preset = Some("server".into());
        assert_eq!(c.validate().unwrap_err().field(), "client.preset");
        let mut s = ServerConfig::server();
        s.preset = Some("standard-server".into());
        assert_eq!(s.validate().unwrap_err().field(), "server.preset");
    }

    /// A growth so slow that two delays in a row round to the same nanosecond was read
    /// as "no longer growing", counting 300 retries as 300 ns: the backoff's real waits
    /// (about 10 minutes here) passed the deadline unchecked.
    #[test]
    fn a_backoff_that_repeats_a_rounded_delay_is_still_checked_against_the_deadline() {
        let toml = "deadline = \"30s\"\n[retry]\nmax_retries = 300\n\
            backoff = { kind = \"exponential\", base = \"1ns\", factor = 1.1, \
            max_delay = \"10s\" }\n";
        let e = ClientConfig::from_str(toml, Format::Toml).unwrap_err();
        assert!(
            e.field()
                .is_some_and(|f| f.ends_with("retry.backoff.max_delay")),
            "{e}"
        );
    }

    #[test]
    fn a_retry_that_cannot_be_built_is_refused_when_the_file_is_read() {
        // The retry layer's own build refuses it; reading the file must too, not the
        // later `layer()`.
        let toml = "deadline = \"72h\"\n[retry]\nmax_retry_after = \"48h\"\n";
        let e = ClientConfig::from_str(toml, Format::Toml).unwrap_err();
        assert!(
            e.field()
                .is_some_and(|f| f.ends_with("retry.max_retry_after")),
            "{e}"
        );
        let toml = "[retry.budget]\nratio = 0.0\nmin_retries_per_sec = 0\n";
        let e = ClientConfig::from_str(toml, Format::Toml).unwrap_err();
        assert!(
            e.field().is_some_and(|f| f.ends_with("retry.budget")),
            "{e}"
        );
    }

    #[test]
    fn an_enqueue_ttl_of_off_never_expires_and_reads_back() {
        let c = ClientConfig::from_str("[enqueue]\nttl = \"off\"\n", Format::Toml).unwrap();
        assert_eq!(c.enqueue.to_enqueue_config().ttl, None);
        let c = ClientConfig::from_str("[enqueue]\nttl = \"2h\"\n", Format::Toml).unwrap();
        assert_eq!(
            c.enqueue.to_enqueue_config().ttl,
            Some(Duration::from_secs(7200))
        );
        assert_eq!(
            ClientConfig::default().enqueue.to_enqueue_config().ttl,
            Some(Duration::from_secs(24 * 3600))
        );
    }

    #[test]
    fn enqueue_max_retry_after_reaches_the_enqueue_config() {
        let c = ClientConfig::default();
        assert_eq!(
            c.enqueue.to_enqueue_config().max_retry_after,
            Duration::from_secs(3600)
        );
        let c =
            ClientConfig::from_str("[enqueue]\nmax_retry_after = \"5m\"\n", Format::Toml).unwrap();
        assert_eq!(
            c.enqueue.to_enqueue_config().max_retry_after,
            Duration::from_secs(300)
        );
        // Rendered, and read back.
        let stack = StackConfig {
            client: c,
            ..Default::default()
        };
        let shown = stack.to_string();
        assert!(shown.contains("max_retry_after = \"5m\""), "{shown}");
        assert_eq!(StackConfig::from_str(&shown, Format::Toml).unwrap(), stack);
    }

    #[test]
    fn layer_errors_are_prefixed() {
        let mut c = ClientConfig::default();
        c.bulkhead.max_concurrent = 0;
        assert_eq!(
            c.validate().unwrap_err().field(),
            "client.bulkhead.max_concurrent"
        );
        let mut c = ClientConfig::default();
        c.breaker_keys.max_keys = 0;
        assert_eq!(
            c.validate().unwrap_err().field(),
            "client.breaker_keys.max_keys"
        );
    }
}
