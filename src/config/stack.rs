//! The standard stacks as `tower::Layer`s with nameable service types.

use super::{ClientConfig, ServerConfig};
use crate::bulkhead::{Bulkhead, BulkheadLayer, KeyedBulkhead, KeyedBulkheadLayer};
use crate::circuit_breaker::{
    ByAuthority, KeyedCircuitBreaker, KeyedCircuitBreakerHandle, KeyedCircuitBreakerLayer,
};
use crate::classify::HttpClassifier;
use crate::enqueue::{EnqueueFallback, EnqueueFallbackLayer};
use crate::error::ConfigError;
use crate::http::body::{BufferBody, BufferBodyLayer};
use crate::http::{ErrorResponse, ErrorResponseLayer};
use crate::idempotency::{Idempotency, IdempotencyLayer, MemoryStore};
use crate::retry::{HttpRequests, Retry, RetryLayer, RetryPolicy};
use crate::timeout::{
    AttemptTimeout, AttemptTimeoutLayer, Deadline, DeadlineLayer, HttpPropagation,
};
use http::uri::Authority;
use std::fmt;
use std::sync::Arc;
use tower_layer::Layer;

/// The retry policy of the client stack: HTTP classification, HTTP request safety, no hook.
pub type HttpRetryPolicy = RetryPolicy<HttpClassifier, HttpRequests, ()>;

/// The client stack around `S`, outer to inner: deadline → body buffer → retry →
/// bulkhead per authority → circuit breaker per authority → attempt timeout → `S`.
///
/// The bulkhead is outside the breaker (the layers alone go breaker → bulkhead): a
/// per-authority bulkhead learns the key in `call`, so a call that must wait for its
/// permit waits in its response future, and inside the breaker that wait would count
/// as the call's own time, a slow call of our own making.
///
/// `S` serves `http::Request<ReplayBody<B>>` (the buffered body) and answers
/// `http::Response<_>`; errors are [`BoxError`](crate::BoxError).
pub type Client<S> = Deadline<
    BufferBody<
        Retry<
            KeyedBulkhead<
                KeyedCircuitBreaker<
                    AttemptTimeout<S, HttpPropagation>,
                    Authority,
                    ByAuthority,
                    HttpClassifier,
                >,
                Authority,
                ByAuthority,
            >,
            HttpRetryPolicy,
        >,
    >,
    HttpPropagation,
>;

/// The client stack behind the enqueue fallback: a request that may be deferred is
/// stored in `Q` and answered `202 Accepted` when the stack inside fails in a way that
/// may be deferred.
pub type DeferringClient<S, Q> = EnqueueFallback<Client<S>, Q, HttpClassifier>;

/// The server stack around `S`, outer to inner: errors as responses → deadline →
/// idempotency → bulkhead (fail fast) → `S`. Its error is `Infallible`, as axum wants.
///
/// The bulkhead is inside the idempotency layer: a keyed handler runs to its end even
/// after the deadline gave up on it (so its effect is not cut in half), and it keeps
/// its permit until then, so such handlers still count against `max_concurrent`.
pub type Server<S, St = MemoryStore> =
    ErrorResponse<Deadline<Idempotency<Bulkhead<S>, St>, HttpPropagation>>;

/// The client stack of a [`ClientConfig`] as one `tower::Layer`; see
/// [`ClientConfig::layer`].
///
/// Every service it makes (and every clone) shares one retry budget, one set of
/// per-authority breakers and one set of per-authority bulkheads: the `bulkhead`
/// section's limits hold for each host, so a host that answers slowly fills its own
/// bulkhead and calls to the others go on.
///
/// # Example
/// ```
/// use postbox::config::ClientConfig;
/// use postbox::http::reqwest::ReqwestService;
/// use tower::ServiceBuilder;
///
/// # fn main() -> Result<(), postbox::error::ConfigError> {
/// let stack = ClientConfig::standard_http_client().layer()?;
/// let breakers = stack.breakers();
/// let client = ServiceBuilder::new()
///     .layer(stack)
///     .service(ReqwestService::new(reqwest::Client::new()));
/// # let _ = (client, breakers); Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientLayer {
    deadline: DeadlineLayer<HttpPropagation>,
    buffer: BufferBodyLayer,
    retry: RetryLayer<HttpRetryPolicy>,
    breaker: KeyedCircuitBreakerLayer<Authority, ByAuthority, HttpClassifier>,
    bulkhead: KeyedBulkheadLayer<Authority, ByAuthority>,
    attempt: AttemptTimeoutLayer<HttpPropagation>,
}

/// The client stack with the enqueue fallback outermost, deferring into `Q`; see
/// [`ClientConfig::deferring_layer`].
pub struct DeferringClientLayer<Q> {
    client: ClientLayer,
    fallback: EnqueueFallbackLayer<Q>,
}

// === impl DeferringClientLayer ===

impl<Q> DeferringClientLayer<Q> {
    /// The client stack inside the fallback (its breakers, bulkhead, retry).
    pub fn client(&self) -> &ClientLayer {
        &self.client
    }

    /// The queue requests are deferred into.
    pub fn queue(&self) -> &Arc<Q> {
        self.fallback.queue()
    }
}

impl<Q> Clone for DeferringClientLayer<Q> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            fallback: self.fallback.clone(),
        }
    }
}

impl<Q> fmt::Debug for DeferringClientLayer<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferringClientLayer")
            .field("client", &self.client)
            .field("fallback", &self.fallback)
            .finish()
    }
}

impl<S, Q> Layer<S> for DeferringClientLayer<Q> {
    type Service = DeferringClient<S, Q>;

    fn layer(&self, inner: S) -> Self::Service {
        self.fallback.layer(self.client.layer(inner))
    }
}

// === impl ClientLayer ===

impl ClientLayer {
    /// A handle to the per-authority circuit breakers (state, metrics, force open …).
    pub fn breakers(&self) -> KeyedCircuitBreakerHandle<Authority> {
        self.breaker.handle()
    }

    /// The free permits of the bulkhead of `authority` (as
    /// [`ByAuthority`](crate::circuit_breaker::ByAuthority) names it: `"api"`, not
    /// `"api:443"`, for `https://api`).
    pub fn available_permits(&self, authority: &Authority) -> usize {
        self.bulkhead.available_permits(authority)
    }

    /// The retry layer (its policy and budget).
    pub fn retry(&self) -> &RetryLayer<HttpRetryPolicy> {
        &self.retry
    }
}

impl<S> Layer<S> for ClientLayer {
    type Service = Client<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let svc = self.attempt.layer(inner);
        let svc = self.breaker.layer(svc);
        let svc = self.bulkhead.layer(svc);
        let svc = self.retry.layer(svc);
        let svc = self.buffer.layer(svc);
        self.deadline.layer(svc)
    }
}

// === impl ClientConfig (stacks) ===

impl ClientConfig {
    /// Validates the configuration and builds the client stack (without the enqueue
    /// fallback).
    ///
    /// # Errors
    /// The first invalid field ([`validate`](Self::validate)).
    pub fn layer(&self) -> Result<ClientLayer, ConfigError> {
        self.client_layer(false)
    }

    /// The client stack; `deferring` if an enqueue fallback sits outside it.
    fn client_layer(&self, deferring: bool) -> Result<ClientLayer, ConfigError> {
        self.validate()?;
        let prefix = |e: ConfigError| super::prefixed("client", e);
        Ok(ClientLayer {
            deadline: DeadlineLayer::http(self.deadline).map_err(prefix)?,
            buffer: self
                .stream_through
                .iter()
                .try_fold(BufferBodyLayer::new(self.buffer_body), |layer, method| {
                    layer.stream_through(method.clone())
                })
                .map_err(prefix)?,
            retry: {
                // A hint longer than the whole call can only end in the deadline.
                let mut retry = self.retry.clone();
                retry.max_retry_after = retry.max_retry_after.min(self.deadline);
                // Behind a fallback, a call an open breaker rejects is deferred at
                // once, not held for the break (unless the file says otherwise).
                let open_wait = retry.max_open_wait.unwrap_or(if deferring {
                    std::time::Duration::ZERO
                } else {
                    retry.max_retry_after
                });
                retry.max_open_wait = Some(open_wait.min(self.deadline));
                let builder = RetryLayer::http()
                    .classifier(self.classify.to_classifier())
                    .requests(retry.http_requests());
                retry
                    .apply(builder)
                    .and_then(crate::retry::RetryBuilder::build)
                    .map_err(prefix)?
            },
            breaker: self
                .circuit_breaker
                .builder()
                .keyed_by_authority()
                .max_keys(self.breaker_keys.max_keys)
                .idle_timeout(self.breaker_keys.idle_timeout)
                .build()
                .map_err(prefix)?
                .with_classifier(self.classify.to_classifier()),
            bulkhead: self
                .bulkhead
                .builder()
                .keyed_by_authority()
                .map_err(prefix)?,
            attempt: AttemptTimeoutLayer::http(self.attempt_timeout).map_err(prefix)?,
        })
    }

    /// Validates the configuration and builds the client stack behind the enqueue
    /// fallback, deferring into `queue` as the `enqueue` section says.
    ///
    /// # Errors
    /// The first invalid field, or `client.enqueue.enabled` when it is `false`.
    pub fn deferring_layer<Q>(
        &self,
        queue: Arc<Q>,
    ) -> Result<DeferringClientLayer<Q>, ConfigError> {
        if !self.enqueue.enabled {
            return Err(ConfigError::new(
                "client.enqueue.enabled",
                "is false: set it to true to defer requests to a queue",
            ));
        }
        let client = self.client_layer(true)?;
        let fallback = EnqueueFallbackLayer::with_config(queue, self.enqueue.to_enqueue_config())
            .map_err(|e| super::prefixed("client", e))?
            .with_classifier(self.classify.to_classifier());
        Ok(DeferringClientLayer { client, fallback })
    }
}

/// The server stack of a [`ServerConfig`] as one `tower::Layer`; see
/// [`ServerConfig::layer`].
///
/// Put it on an axum `Router` with `Router::layer` (it then wraps every route, all
/// sharing one bulkhead and one idempotency store), or around the whole router with
/// `ServiceBuilder::new().layer(stack).service(router)`.
///
/// # Example
/// ```
/// use axum::{Router, routing::post};
/// use postbox::config::ServerConfig;
///
/// # fn main() -> Result<(), postbox::error::ConfigError> {
/// let app: Router = Router::new()
///     .route("/orders", post(|| async { "stored" }))
///     .layer(ServerConfig::server().layer()?);
/// # let _ = app; Ok(()) }
/// ```
#[derive(Debug)]
pub struct ServerLayer<St = MemoryStore> {
    deadline: DeadlineLayer<HttpPropagation>,
    bulkhead: BulkheadLayer,
    idempotency: IdempotencyLayer<St>,
}

// === impl ServerLayer ===

impl<St> ServerLayer<St> {
    /// The bulkhead's free permits.
    pub fn available_permits(&self) -> usize {
        self.bulkhead.available_permits()
    }

    /// The idempotency store.
    pub fn store(&self) -> &Arc<St> {
        self.idempotency.store()
    }
}

impl<St> Clone for ServerLayer<St> {
    fn clone(&self) -> Self {
        Self {
            deadline: self.deadline,
            bulkhead: self.bulkhead.clone(),
            idempotency: self.idempotency.clone(),
        }
    }
}

impl<S, St> Layer<S> for ServerLayer<St> {
    type Service = Server<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        let svc = self.bulkhead.layer(inner);
        let svc = self.idempotency.layer(svc);
        let svc = self.deadline.layer(svc);
        ErrorResponseLayer::new().layer(svc)
    }
}

// === impl ServerConfig (stack) ===

impl ServerConfig {
    /// Validates the configuration and builds the server stack.
    ///
    /// # Errors
    /// The first invalid field ([`validate`](Self::validate)).
    pub fn layer(&self) -> Result<ServerLayer, ConfigError> {
        let capacity = self.idempotency.capacity;
        self.layer_with_store(Arc::new(MemoryStore::new(capacity)))
    }

    /// [`layer`](Self::layer) with the idempotency layer on `store` instead of a
    /// [`MemoryStore`] of `idempotency.capacity` (which is then not used, though still
    /// validated, as is `max_body`'s cap of the in-memory store's 256 MiB): a shared
    /// store, such as `RedisStore` (feature `redis`), that every instance of the
    /// service uses and that a restart keeps (see "Exactly-once effect" in the
    /// `enqueue` docs).
    ///
    /// # Errors
    /// The first invalid field ([`validate`](Self::validate)).
    pub fn layer_with_store<St>(&self, store: Arc<St>) -> Result<ServerLayer<St>, ConfigError> {
        self.validate()?;
        let prefix = |e: ConfigError| super::prefixed("server", e);
        let propagation = if self.honour_inbound_deadline {
            HttpPropagation::new().with_inbound_headers()
        } else {
            HttpPropagation::new().ignoring_inbound_headers()
        };
        let i = &self.idempotency;
        let mut idempotency = IdempotencyLayer::with_store(store)
            .ttl(i.ttl)
            .and_then(|l| l.lock_for(i.lock_for))
            .map_err(prefix)?
            .max_body(i.max_body);
        if let Some(h) = &i.scope_by {
            // Checked by `validate`.
            if let Ok(h) = http::HeaderName::from_bytes(h.as_bytes()) {
                idempotency = idempotency.scope_by(h);
            }
        }
        for method in &i.stream_through {
            idempotency = idempotency.stream_through(method.clone()).map_err(prefix)?;
        }
        if i.require_key {
            idempotency = idempotency.require_key();
        }
        Ok(ServerLayer {
            deadline: DeadlineLayer::with_propagation(self.deadline, propagation)
                .map_err(prefix)?,
            bulkhead: self.bulkhead.build().map_err(prefix)?,
            idempotency,
        })
    }
}
