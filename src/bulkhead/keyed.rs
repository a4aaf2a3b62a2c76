//! One bulkhead per key (per authority, tenant …): [`KeyedBulkhead`].

use super::future::ResponseFuture;
use super::service::{Bulkhead, Shared};
use crate::BoxError;
use crate::circuit_breaker::KeyFn;
use crate::circuit_breaker::keyed::BuildBuffered;
use pin_project_lite::pin_project;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tower_layer::Layer;
use tower_service::Service;

/// The map is swept of unused bulkheads when it reaches this many keys, or twice as
/// many as the last sweep left, whichever is more.
const SWEEP_FROM: usize = 64;

/// The bulkheads by key, and what a new one is made with.
pub(crate) struct Keys<K> {
    /// Hashed as the keyed breakers' map is (see [`BuildBuffered`]).
    map: RwLock<HashMap<K, Arc<Shared>, BuildBuffered>>,
    /// Sweep when the map reaches this size.
    sweep_at: AtomicUsize,
    max_concurrent: usize,
    max_waiting: usize,
    max_wait: Option<Duration>,
}

impl<K: Hash + Eq> Keys<K> {
    pub(crate) fn new(
        max_concurrent: usize,
        max_waiting: usize,
        max_wait: Option<Duration>,
    ) -> Self {
        Self {
            map: RwLock::new(HashMap::default()),
            sweep_at: AtomicUsize::new(SWEEP_FROM),
            max_concurrent,
            max_waiting,
            max_wait,
        }
    }

    /// The bulkhead of `key`, made if it has none.
    ///
    /// A bulkhead nothing holds but the map (no call in flight or waiting, no service
    /// made for a call) is the same as a new one, so the map keeps only those in use:
    /// it is swept of the others as it grows, and its size is bounded by the calls in
    /// flight, not by how many keys were ever seen.
    #[inline]
    fn get(&self, key: K) -> Arc<Shared> {
        if let Some(shared) = self.map.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return shared.clone();
        }
        self.insert(key)
    }

    #[cold]
    fn insert(&self, key: K) -> Arc<Shared> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.sweep_at.load(Relaxed) {
            // Under the write lock nobody can take a new reference to an entry, so a
            // count of one is final: it is unused.
            map.retain(|_, shared| Arc::strong_count(shared) > 1);
            self.sweep_at
                .store((map.len() * 2).max(SWEEP_FROM), Relaxed);
        }
        map.entry(key)
            .or_insert_with(|| {
                Arc::new(Shared::new(
                    self.max_concurrent,
                    self.max_waiting,
                    self.max_wait,
                ))
            })
            .clone()
    }

    /// Free permits of `key`'s bulkhead.
    fn available_permits(&self, key: &K) -> usize {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map_or(self.max_concurrent, |s| s.available_permits())
    }

    /// Keys whose bulkhead is in use (or not yet swept).
    fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl<K> fmt::Debug for Keys<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("max_concurrent", &self.max_concurrent)
            .field("max_waiting", &self.max_waiting)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

/// Applies a [`KeyedBulkhead`]: one bulkhead per key, every one with the same limits.
/// Built by [`BulkheadBuilder::keyed`](super::BulkheadBuilder::keyed) (or
/// [`keyed_by_authority`](super::BulkheadBuilder::keyed_by_authority)).
///
/// Every service it makes (and every clone) shares one set of bulkheads.
pub struct KeyedBulkheadLayer<K, F> {
    keys: Arc<Keys<K>>,
    key_fn: F,
}

impl<K: Hash + Eq, F> KeyedBulkheadLayer<K, F> {
    pub(crate) fn new(keys: Keys<K>, key_fn: F) -> Self {
        Self {
            keys: Arc::new(keys),
            key_fn,
        }
    }

    /// Free permits of the bulkhead of `key` (`max_concurrent` for a key with no call).
    pub fn available_permits(&self, key: &K) -> usize {
        self.keys.available_permits(key)
    }

    /// How many keys have a bulkhead: those with calls in flight or waiting, and
    /// unused ones not yet swept away.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }
}

impl<K, F: Clone> Clone for KeyedBulkheadLayer<K, F> {
    fn clone(&self) -> Self {
        Self {
            keys: self.keys.clone(),
            key_fn: self.key_fn.clone(),
        }
    }
}

impl<K, F: fmt::Debug> fmt::Debug for KeyedBulkheadLayer<K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBulkheadLayer")
            .field("keys", &self.keys)
            .field("key_fn", &self.key_fn)
            .finish()
    }
}

impl<S, K, F: Clone> Layer<S> for KeyedBulkheadLayer<K, F> {
    type Service = KeyedBulkhead<S, K, F>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedBulkhead {
            inner,
            keys: self.keys.clone(),
            key_fn: self.key_fn.clone(),
        }
    }
}

/// A bulkhead per key: calls for one key (a host that answers slowly) never take the
/// permits of another. Each key's bulkhead is a [`Bulkhead`] with the limits the
/// builder was given, and behaves as one (fail fast, or a bounded wait; not
/// backpressure, which needs the key in `poll_ready`).
///
/// The key is known only from the request, so admission happens in `call`:
/// `poll_ready` readies the inner service, and `call` takes the key's permit and calls
/// it. When the key is full, the inner service made ready for nothing is swapped for a
/// fresh clone (what its readiness reserved goes back at once), and the call is
/// rejected with [`Full`](super::error::Full), or, where waiting is allowed, waits in
/// its response future for the key's permit (up to `max_wait`) and then readies and
/// calls a clone of its own. The inner service must be `Clone` (as a
/// client is: a clone shares its connections). That clone is readied holding the key's
/// permit, as a plain [`Bulkhead`] readies its inner service: `max_wait` bounds the wait
/// for the permit, not an inner service slow to be ready after it (a bulkhead all keys
/// share, a full buffer); bound that with a deadline outside. Readying first would hold
/// what the clone's readiness reserves from the other keys for the whole wait.
///
/// So a waiting call waits in its response future, not in `poll_ready`: put a keyed
/// bulkhead outside a circuit breaker (see the [module docs](super)).
///
/// Nothing bounds the calls across keys: N keys in flight may hold N × `max_concurrent`
/// permits. Where callers choose the key (`keyed_by_authority` reads the `Host` header
/// when the URI has no authority), put a plain [`Bulkhead`] outside for a total limit.
/// Unused bulkheads are swept only when a new key arrives, so after a burst of keys the
/// map stays at its size until then (each entry a few words).
///
/// Errors become [`BoxError`].
pub struct KeyedBulkhead<S, K, F> {
    inner: S,
    keys: Arc<Keys<K>>,
    key_fn: F,
}

impl<S: Clone, K, F: Clone> Clone for KeyedBulkhead<S, K, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            keys: self.keys.clone(),
            key_fn: self.key_fn.clone(),
        }
    }
}

impl<S: fmt::Debug, K, F: fmt::Debug> fmt::Debug for KeyedBulkhead<S, K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBulkhead")
            .field("inner", &self.inner)
            .field("keys", &self.keys)
            .field("key_fn", &self.key_fn)
            .finish()
    }
}

impl<S, K, F, Req> Service<Req> for KeyedBulkhead<S, K, F>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    K: Hash + Eq,
    F: KeyFn<Req, K>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = KeyedResponseFuture<S, Req>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let shared = self.keys.get(self.key_fn.key(&req));
        let state = match shared.try_acquire() {
            Some(permit) => KeyedState::Called {
                future: ResponseFuture::running(self.inner.call(req), permit),
            },
            None => self.full(shared, req),
        };
        KeyedResponseFuture { state }
    }
}

impl<S: Clone, K, F> KeyedBulkhead<S, K, F> {
    /// The key's bulkhead is full: reject at once, or wait in the future.
    #[cold]
    fn full<Req>(&mut self, shared: Arc<Shared>, req: Req) -> KeyedState<S, Req>
    where
        S: Service<Req>,
    {
        // The ready service is not called now: what its readiness reserved (a permit
        // of a bulkhead all keys share, a buffer slot) goes back at once. A waiting
        // call readies a clone of its own once it has its key's permit: holding the
        // reservation through its wait would take it from the other keys.
        self.inner = self.inner.clone();
        if !shared.may_wait() {
            tracing::debug!("bulkhead full; rejecting");
            return KeyedState::Called {
                future: super::service::rejected(shared.full()),
            };
        }
        KeyedState::Admitting {
            waiting: Box::new((Bulkhead::new(self.inner.clone(), shared), Some(req))),
        }
    }
}

pin_project! {
    /// Response future of [`KeyedBulkhead`]: the call, holding its key's permit until
    /// it is done (or the future dropped); or, where the key was full and waiting is
    /// allowed, the wait for a permit first.
    pub struct KeyedResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: KeyedState<S, Req>,
    }
}

pin_project! {
    #[project = KeyedStateProj]
    enum KeyedState<S, Req>
    where
        S: Service<Req>,
    {
        // Boxed: the slow path only, and the request would make every future large.
        Admitting {
            waiting: Box<(Bulkhead<S>, Option<Req>)>,
        },
        Called {
            #[pin]
            future: ResponseFuture<S::Future>,
        },
    }
}

impl<S, Req> fmt::Debug for KeyedResponseFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            KeyedState::Admitting { .. } => "admitting",
            KeyedState::Called { .. } => "called",
        };
        f.debug_struct("KeyedResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, Req> Future for KeyedResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                KeyedStateProj::Admitting { waiting } => {
                    let (bulkhead, req) = &mut **waiting;
                    ready!(bulkhead.poll_ready(cx))?;
                    let req = req.take().expect("polled after completion");
                    let future = bulkhead.call(req);
                    this.state.set(KeyedState::Called { future });
                }
                KeyedStateProj::Called { future } => return future.poll(cx),
            }
        }
    }
}
