//! One independent breaker per key (per authority, route, tenant …).

use super::config::CircuitBreakerBuilder;
use super::error::Error;
use super::future::{Guard, ResponseFuture};
use super::handle::CircuitBreakerHandle;
use super::shared::Ref;
use super::state::{Breaker, Now, OnTransition, State, Transition};
use crate::classify::{Classify, ErrorClassifier};
use crate::error::ConfigError;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

/// Picks the key of a request: implemented by any `Fn(&Req) -> K` and, with the `http`
/// feature, by [`ByAuthority`].
pub trait KeyFn<Req, K> {
    /// The key of `req`.
    fn key(&self, req: &Req) -> K;
}

impl<F, Req, K> KeyFn<Req, K> for F
where
    F: Fn(&Req) -> K,
{
    #[inline]
    fn key(&self, req: &Req) -> K {
        self(req)
    }
}

/// Keys HTTP requests by their authority (`host:port` of the URI, else the `Host`
/// header, else `"-"`), as an [`http::uri::Authority`]: compared and hashed without
/// regard to case, and taken from the URI without a copy (a clone shares its bytes), so
/// a call to a URI's authority allocates nothing for its key.
///
/// The key names the breaker in logs and metrics, so userinfo (`user:password@`) is
/// dropped from it, and the scheme's default port (`:443` for `https`, `:80` for
/// `http`) too, so `https://api` and `https://api:443` share one breaker. (A `Host`
/// header has no scheme: its port is kept.) Name a key on the handle as it is made
/// here: `"api"`, not `"api:443"`.
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, Default)]
pub struct ByAuthority;

#[cfg(feature = "http")]
impl<B> KeyFn<http::Request<B>, http::uri::Authority> for ByAuthority {
    fn key(&self, req: &http::Request<B>) -> http::uri::Authority {
        if let Some(a) = req.uri().authority() {
            return plain_authority(a, req.uri().scheme_str());
        }
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
            .map_or_else(
                || http::uri::Authority::from_static("-"),
                |a| plain_authority(&a, None),
            )
    }
}

/// `a` without userinfo and without the default port of `scheme`: `a` itself (a clone,
/// no copy) when it has neither.
#[cfg(feature = "http")]
fn plain_authority(a: &http::uri::Authority, scheme: Option<&str>) -> http::uri::Authority {
    let default_port = match (scheme, a.port_u16()) {
        (Some(s), Some(p)) => {
            (s.eq_ignore_ascii_case("https") && p == 443)
                || (s.eq_ignore_ascii_case("http") && p == 80)
        }
        _ => false,
    };
    if !default_port && !a.as_str().contains('@') {
        return a.clone();
    }
    let plain = match a.port() {
        Some(port) if !default_port => format!("{}:{port}", a.host()),
        _ => a.host().to_owned(),
    };
    // No host left (`u:pw@:443`): never the original, whose userinfo would be shown.
    http::uri::Authority::try_from(plain).unwrap_or_else(|_| http::uri::Authority::from_static("-"))
}

/// The breakers by key: SipHash with a random key per map (keys may come from
/// requests), fed eight bytes at a time.
type KeyMap<K> = HashMap<K, Entry, BuildBuffered>;

/// Builds [`Buffered`] hashers from one random SipHash key (per map, as
/// `RandomState`).
#[derive(Default, Clone)]
pub(crate) struct BuildBuffered(std::hash::RandomState);

impl BuildHasher for BuildBuffered {
    type Hasher = Buffered;

    #[inline]
    fn build_hasher(&self) -> Buffered {
        Buffered {
            inner: self.0.build_hasher(),
            buf: 0,
            len: 0,
        }
    }
}

/// A hasher that buffers the single bytes some `Hash` impls write one call each
/// (`http::uri::Authority` writes every byte, lower-cased, with `write_u8`) and feeds
/// the keyed SipHash eight at a time: the same protection against chosen keys, a
/// fraction of the calls.
pub(crate) struct Buffered {
    inner: std::hash::DefaultHasher,
    buf: u64,
    len: u32,
}

impl std::hash::Hasher for Buffered {
    #[inline]
    fn write_u8(&mut self, b: u8) {
        self.buf |= u64::from(b) << (8 * self.len);
        self.len += 1;
        if self.len == 8 {
            self.inner.write_u64(self.buf);
            self.buf = 0;
            self.len = 0;
        }
    }

    #[inline]
    fn write(&mut self, mut bytes: &[u8]) {
        while self.len != 0 && !bytes.is_empty() {
            self.write_u8(bytes[0]);
            bytes = &bytes[1..];
        }
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.inner
                .write_u64(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        for &b in words.remainder() {
            self.write_u8(b);
        }
    }

    #[inline]
    fn finish(&self) -> u64 {
        let mut inner = self.inner.clone();
        inner.write_u64(self.buf);
        inner.write_u32(self.len);
        inner.finish()
    }
}

struct Entry {
    breaker: Arc<Ref>,
    last_used_ns: AtomicU64,
}

/// The hook shared by every per-key breaker.
struct SharedHook(Arc<dyn OnTransition>);

impl OnTransition for SharedHook {
    fn on_transition(&self, t: &Transition) {
        self.0.on_transition(t)
    }
}

struct Keys<K> {
    template: CircuitBreakerBuilder,
    hook: Arc<dyn OnTransition>,
    /// Read-locked by the calls of known keys; written only to add a key.
    map: RwLock<KeyMap<K>>,
    max_keys: usize,
    /// How many breakers in a state set by hand the map held when it was last trimmed:
    /// they count on top of `max_keys`, so the map is trimmed only once it holds
    /// `max_keys` more than these (not scanned for every new key while they alone fill
    /// the bound). Only a hint: a stale one at worst delays or hastens a trim.
    manual: AtomicUsize,
    idle: Duration,
    origin: Instant,
    /// The highest generation of a breaker dropped from the map: a key's next breaker
    /// starts there (see `Breaker::start_at_generation`).
    retired_generation: AtomicU64,
}

impl<K> Keys<K> {
    /// Notes the generations of the breakers just dropped (under the write lock, before
    /// any breaker made after them is added).
    fn note_retired(&self, evicted: &[Entry]) {
        for e in evicted {
            self.retired_generation
                .fetch_max(e.breaker.breaker().current_generation(), Relaxed);
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, KeyMap<K>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, KeyMap<K>> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }

    fn ns(&self, t: Instant) -> u64 {
        crate::duration::nanos(t.saturating_duration_since(self.origin))
    }
}

impl<K: Hash + Eq + Clone + fmt::Display> Keys<K> {
    /// The breaker for `key`, created (and the map trimmed) if needed.
    fn get(&self, key: K, now: Instant) -> Arc<Ref> {
        match self.lookup(&key, now) {
            Some(breaker) => breaker,
            None => self.make(key, now),
        }
    }

    /// [`get`](Self::get), for a call about to be admitted at `now`: if the breaker had
    /// to be made (a window allocated, the write lock waited for, the map trimmed),
    /// `now` is read again after, so a slow call's clock does not count that work.
    #[inline]
    fn get_timed(&self, key: K, now: &mut Instant) -> Arc<Ref> {
        if let Some(breaker) = self.lookup(&key, *now) {
            return breaker;
        }
        let breaker = self.make(key, *now);
        *now = Instant::now();
        breaker
    }

    /// The breaker kept for `key`, marked used at `now`.
    #[inline]
    fn lookup(&self, key: &K, now: Instant) -> Option<Arc<Ref>> {
        let e = self.read();
        let e = e.get(key)?;
        e.last_used_ns.store(self.ns(now), Relaxed);
        Some(e.breaker.clone())
    }

    /// Makes the breaker for `key` (unless another call made it meanwhile), trimming
    /// the map if it is full.
    #[cold]
    fn make(&self, key: K, now: Instant) -> Arc<Ref> {
        let now_ns = self.ns(now);
        // Made before the write lock every call of every key waits on (its window's
        // allocation, the key's hash and name); thrown away if another call adds the
        // key first.
        let fresh = self.new_breaker(&key, now);
        // Dropped (their windows freed) after the lock is let go.
        let mut evicted = Vec::new();
        let mut map = self.write();
        if let Some(e) = map.get(&key) {
            // Added by another call in between.
            e.last_used_ns.store(now_ns, Relaxed);
            return e.breaker.clone();
        }
        if map.len() >= self.max_keys.saturating_add(self.manual.load(Relaxed)) {
            self.evict(&mut map, now, now_ns, &mut evicted);
            self.note_retired(&evicted);
        }
        // Not shared yet: nothing was admitted on it.
        fresh
            .breaker()
            .start_at_generation(self.retired_generation.load(Relaxed));
        // Not set on the gauge until it first leaves closed: one series per key ever
        // seen would grow the metrics recorder without bound where keys come from
        // requests (an authority behind a proxy), whatever `max_keys` says.
        map.insert(
            key,
            Entry {
                breaker: fresh.clone(),
                last_used_ns: AtomicU64::new(now_ns),
            },
        );
        drop(map);
        drop(evicted);
        fresh
    }

    /// A new breaker for `key`, from the template.
    fn new_breaker(&self, key: &K, now: Instant) -> Arc<Ref> {
        let mut settings = self.template.settings();
        // A seeded jitter gets a sequence of its own per key (the same in every run):
        // one seed for all would shorten every key's break alike.
        settings.seed = settings.seed.map(|seed| {
            let mut h = std::hash::DefaultHasher::new();
            key.hash(&mut h);
            seed ^ std::hash::Hasher::finish(&h)
        });
        settings.name = if settings.name.is_empty() {
            key.to_string().into()
        } else {
            format!("{}/{key}", settings.name).into()
        };
        Ref::new(Arc::new(Breaker::new(
            settings,
            now,
            Box::new(SharedHook(self.hook.clone())),
        )))
    }

    /// Drops the breakers idle for longer than `idle`; if the map is still full, the
    /// least recently used closed one without a call in flight (one with calls in
    /// flight, then an open or half-open breaker, only when every other is: dropping it
    /// would let a flood of new keys reset the breakers that protect a failing
    /// dependency), and with it up to 1/64 of the map more of the least recently used
    /// closed ones without calls. A breaker in a state set by hand is never
    /// dropped: that would undo it.
    ///
    /// The entries taken out go to `evicted`, to be dropped once the lock is let go.
    fn evict(&self, map: &mut KeyMap<K>, now: Instant, now_ns: u64, evicted: &mut Vec<Entry>) {
        retain_active(map, now, now_ns, self.idle, evicted);
        if map.len() < self.max_keys {
            return;
        }
        // Closed breakers without a call first, least recently used first; then those
        // with calls in flight (their outcomes would land in a dropped breaker); open
        // and half-open ones last. Those in a state set by hand count on top of the
        // bound: they are neither candidates nor counted against it (counted, they
        // made every new key evict a breaker guarding a failing dependency).
        let mut victims: Vec<((bool, bool, u64), &K)> = map
            .iter()
            .filter(|(_, e)| !is_manual(e))
            .map(|(k, e)| {
                let guarding = e.breaker.breaker().state() != State::Closed;
                ((guarding, in_use(e), e.last_used_ns.load(Relaxed)), k)
            })
            .collect();
        self.manual.store(map.len() - victims.len(), Relaxed);
        if victims.len() < self.max_keys {
            return;
        }
        // Room is made for a batch of new keys at once (1/64 of the map, closed
        // breakers only beyond the one needed): each eviction scans the whole map
        // under the write lock every call waits on, and a flood of new keys would
        // otherwise pay that scan once per key.
        let needed = victims.len() + 1 - self.max_keys;
        let evict = needed.max(self.max_keys / 64).min(victims.len());
        if evict == 0 {
            return;
        }
        if evict < victims.len() {
            victims.select_nth_unstable_by_key(evict - 1, |(rank, _)| *rank);
        }
        // In order, so the one needed is the least recently used closed one.
        victims[..evict].sort_unstable_by_key(|(rank, _)| *rank);
        // Only the keys chosen are cloned (the map cannot change while they are listed).
        let chosen: Vec<K> = victims[..evict]
            .iter()
            .enumerate()
            .filter(|&(i, &((guarding, busy, _), _))| i < needed || !(guarding || busy))
            .map(|(_, (_, k))| (*k).clone())
            .collect();
        for victim in chosen {
            if let Some(e) = map.remove(&victim) {
                // Under the lock: a breaker made for the key after it must not have
                // its gauge reset by this one.
                e.breaker.breaker().retire();
                evicted.push(e);
            }
        }
    }
}

/// Whether the entry's breaker is in a state set by hand (forced open, disabled,
/// metrics only).
fn is_manual(e: &Entry) -> bool {
    matches!(
        e.breaker.breaker().state(),
        State::ForcedOpen | State::Disabled | State::MetricsOnly
    )
}

/// Whether a call in flight (or a service that admitted one and has not made it yet)
/// holds the entry's breaker: the map's is the only other reference.
fn in_use(e: &Entry) -> bool {
    Arc::strong_count(&e.breaker) > 1
}

/// Keeps the breakers used within `idle`, those with a call in flight (idle only by
/// their last admission: a slow call's outcome would land in a dropped breaker), those
/// in a state set by hand, and those still guarding a failing dependency (open with
/// the break not over, or half-open): a key that sees no calls during its break would
/// otherwise come back as a fresh closed breaker and send full traffic to the
/// dependency it was shielding.
fn retain_active<K>(
    map: &mut KeyMap<K>,
    now: Instant,
    now_ns: u64,
    idle: Duration,
    evicted: &mut Vec<Entry>,
) {
    let idle_ns = crate::duration::nanos(idle);
    evicted.extend(
        map.extract_if(|_, e| {
            let keep = now_ns.saturating_sub(e.last_used_ns.load(Relaxed)) < idle_ns
                || in_use(e)
                || is_manual(e)
                || e.breaker.breaker().is_guarding(now);
            if !keep {
                e.breaker.breaker().retire();
            }
            !keep
        })
        .map(|(_, e)| e),
    );
}

/// Builds a [`KeyedCircuitBreakerLayer`]; from
/// [`CircuitBreakerBuilder::keyed`] or [`CircuitBreakerBuilder::keyed_by_authority`].
pub struct KeyedCircuitBreakerBuilder<K, F> {
    template: CircuitBreakerBuilder,
    key_fn: F,
    max_keys: usize,
    idle: Duration,
    _key: PhantomData<fn() -> K>,
}

impl<K, F: fmt::Debug> fmt::Debug for KeyedCircuitBreakerBuilder<K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerBuilder")
            .field("template", &self.template)
            .field("key_fn", &self.key_fn)
            .field("max_keys", &self.max_keys)
            .field("idle_timeout", &self.idle)
            .finish()
    }
}

// === impl CircuitBreakerBuilder (keyed) ===

impl CircuitBreakerBuilder {
    /// One independent breaker per key, the key taken from each request by `key_fn`;
    /// every breaker has this configuration.
    pub fn keyed<Req, K, F>(self, key_fn: F) -> KeyedCircuitBreakerBuilder<K, F>
    where
        F: Fn(&Req) -> K,
    {
        KeyedCircuitBreakerBuilder::new(self, key_fn)
    }

    /// One independent breaker per request authority (see [`ByAuthority`]).
    #[cfg(feature = "http")]
    pub fn keyed_by_authority(
        self,
    ) -> KeyedCircuitBreakerBuilder<http::uri::Authority, ByAuthority> {
        KeyedCircuitBreakerBuilder::new(self, ByAuthority)
    }
}

// === impl KeyedCircuitBreakerBuilder ===

impl<K, F> KeyedCircuitBreakerBuilder<K, F> {
    fn new(template: CircuitBreakerBuilder, key_fn: F) -> Self {
        Self {
            template,
            key_fn,
            max_keys: 1024,
            idle: Duration::from_secs(300),
            _key: PhantomData,
        }
    }

    /// At most this many breakers are kept (default 1024). When a new key arrives and
    /// the map is full, idle breakers are dropped, then the least recently used one
    /// (closed ones first), and with it up to `max_keys / 64` more of the least
    /// recently used closed breakers without a call in flight, idle or not (room for
    /// a batch of new keys, so a flood of them does not scan the map once per key). A
    /// dropped breaker forgets its state and its window (a key close to tripping
    /// starts over): bound the keys generously. A breaker in a state set by hand (forced open, disabled, metrics
    /// only) is never dropped, so those count on top of this bound.
    ///
    /// Each key has a window of its own: memory grows as `max_keys` × the window (a
    /// count window holds a byte per call, a time window 48 bytes per bucket), so the
    /// largest windows (a count of 2^20, 65,535 buckets) at the default 1024 keys take
    /// a gigabyte or more.
    pub fn max_keys(mut self, n: usize) -> Self {
        self.max_keys = n;
        self
    }

    /// A breaker unused for this long may be dropped when room is needed (default
    /// 5 min). An open one in its break, a half-open one, and one with a call in flight
    /// are dropped only as a last resort, when the map is full and no idle closed one
    /// is left (least recently used first): a key whose open breaker goes so starts
    /// again closed.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle = d;
        self
    }

    /// Validates and builds the layer.
    ///
    /// # Errors
    /// The breaker configuration's errors, `max_keys` of 0, or a zero `idle_timeout`.
    pub fn build(mut self) -> Result<KeyedCircuitBreakerLayer<K, F>, ConfigError> {
        self.template.validate()?;
        if self.max_keys == 0 {
            return Err(ConfigError::new(
                "circuit_breaker.max_keys",
                "must be at least 1",
            ));
        }
        if self.idle.is_zero() {
            return Err(ConfigError::new(
                "circuit_breaker.idle_timeout",
                "must be greater than zero",
            ));
        }
        let hook: Arc<dyn OnTransition> = match self.template.take_hook() {
            Some(h) => Arc::from(h),
            None => Arc::new(()),
        };
        Ok(KeyedCircuitBreakerLayer {
            keys: Arc::new(Keys {
                template: self.template,
                hook,
                map: RwLock::new(KeyMap::default()),
                max_keys: self.max_keys,
                manual: AtomicUsize::new(0),
                idle: self.idle,
                origin: Instant::now(),
                retired_generation: AtomicU64::new(0),
            }),
            key_fn: self.key_fn,
            classifier: ErrorClassifier::new(),
        })
    }
}

/// Applies a [`KeyedCircuitBreaker`]: one independent breaker per key, a bounded
/// number of keys. Every service it makes shares the breakers.
pub struct KeyedCircuitBreakerLayer<K, F, C = ErrorClassifier> {
    keys: Arc<Keys<K>>,
    key_fn: F,
    classifier: C,
}

impl<K, F: Clone, C: Clone> Clone for KeyedCircuitBreakerLayer<K, F, C> {
    fn clone(&self) -> Self {
        Self {
            keys: self.keys.clone(),
            key_fn: self.key_fn.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<K, F, C> fmt::Debug for KeyedCircuitBreakerLayer<K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerLayer")
            .field("max_keys", &self.keys.max_keys)
            .field("idle_timeout", &self.keys.idle)
            .finish_non_exhaustive()
    }
}

// === impl KeyedCircuitBreakerLayer ===

impl<K, F, C> KeyedCircuitBreakerLayer<K, F, C> {
    /// Classifies outcomes with `classifier` instead.
    pub fn with_classifier<C2>(self, classifier: C2) -> KeyedCircuitBreakerLayer<K, F, C2> {
        KeyedCircuitBreakerLayer {
            keys: self.keys,
            key_fn: self.key_fn,
            classifier,
        }
    }

    /// A handle to the per-key breakers.
    pub fn handle(&self) -> KeyedCircuitBreakerHandle<K> {
        KeyedCircuitBreakerHandle {
            keys: self.keys.clone(),
        }
    }
}

impl<S, K, F: Clone, C: Clone> Layer<S> for KeyedCircuitBreakerLayer<K, F, C> {
    type Service = KeyedCircuitBreaker<S, K, F, C>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedCircuitBreaker {
            inner,
            keys: self.keys.clone(),
            key_fn: self.key_fn.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// Observes and controls the breakers of a [`KeyedCircuitBreakerLayer`].
pub struct KeyedCircuitBreakerHandle<K> {
    keys: Arc<Keys<K>>,
}

impl<K> Clone for KeyedCircuitBreakerHandle<K> {
    fn clone(&self) -> Self {
        Self {
            keys: self.keys.clone(),
        }
    }
}

impl<K> fmt::Debug for KeyedCircuitBreakerHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerHandle")
            .finish_non_exhaustive()
    }
}

// === impl KeyedCircuitBreakerHandle ===

impl<K: Hash + Eq + Clone> KeyedCircuitBreakerHandle<K> {
    /// The breaker of `key`, if one is kept.
    pub fn get(&self, key: &K) -> Option<CircuitBreakerHandle> {
        self.keys
            .read()
            .get(key)
            .map(|e| CircuitBreakerHandle::new(e.breaker.breaker().clone()))
    }

    /// The keys kept.
    pub fn keys(&self) -> Vec<K> {
        self.keys.read().keys().cloned().collect()
    }

    /// The number of breakers kept.
    pub fn len(&self) -> usize {
        self.keys.read().len()
    }

    /// `true` if no breaker is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every breaker unused for longer than the idle timeout, but those with a
    /// call in flight, those in a state set by hand and those still guarding (open
    /// with the break not over, or half-open).
    pub fn evict_idle(&self) {
        let now = Instant::now();
        let now_ns = self.keys.ns(now);
        let mut evicted = Vec::new();
        let mut map = self.keys.write();
        retain_active(&mut map, now, now_ns, self.keys.idle, &mut evicted);
        self.keys.note_retired(&evicted);
        drop(map);
        // The windows are freed after the lock is let go.
        drop(evicted);
    }
}

impl<K: Hash + Eq + Clone + fmt::Display> KeyedCircuitBreakerHandle<K> {
    /// The breaker of `key`, created (closed) if none is kept: to watch a key before
    /// its first call. Like any closed breaker it may be dropped when idle; to set a
    /// state by hand use [`force_open`](Self::force_open) and the others, which
    /// cannot be lost to an eviction.
    pub fn get_or_insert(&self, key: K) -> CircuitBreakerHandle {
        CircuitBreakerHandle::new(self.keys.get(key, Instant::now()).breaker().clone())
    }

    /// Rejects every call for `key` until another manual change (see
    /// [`CircuitBreakerHandle::force_open`]); creates the key's breaker if none is
    /// kept, so a host known to be bad can be cut off before its first call. A breaker
    /// in a state set by hand is never evicted.
    ///
    /// Unlike `get(&key)?.force_open()`, this cannot be lost: a breaker evicted between
    /// the lookup and the change (it was not yet in a manual state) is replaced by the
    /// key's new breaker, which gets the change.
    pub fn force_open(&self, key: K) {
        self.set_by_hand(key, CircuitBreakerHandle::force_open);
    }

    /// Lets every call for `key` through, recording nothing (see
    /// [`CircuitBreakerHandle::disable`]); creates the key's breaker if needed.
    pub fn disable(&self, key: K) {
        self.set_by_hand(key, CircuitBreakerHandle::disable);
    }

    /// Lets every call for `key` through and records it, never tripping (see
    /// [`CircuitBreakerHandle::metrics_only`]); creates the key's breaker if needed.
    pub fn metrics_only(&self, key: K) {
        self.set_by_hand(key, CircuitBreakerHandle::metrics_only);
    }

    /// Closes `key`'s breaker (see [`CircuitBreakerHandle::force_closed`]), ending a
    /// state set by hand; it may be evicted again when idle. Nothing to do for a key
    /// whose breaker is not kept: it starts closed.
    pub fn force_closed(&self, key: &K) {
        if let Some(h) = self.get(key) {
            h.force_closed();
        }
    }

    fn set_by_hand(&self, key: K, set: impl Fn(&CircuitBreakerHandle)) {
        // The change is made outside the map's lock (a transition hook may use this
        // handle). If the breaker was evicted before it took effect, the key's next
        // breaker gets it; once in a manual state, a breaker is never evicted.
        loop {
            let breaker = self.keys.get(key.clone(), Instant::now());
            let handle = CircuitBreakerHandle::new(breaker.breaker().clone());
            set(&handle);
            // An eviction decides and removes under the write lock: if the entry is
            // still this breaker now, the evictor saw the manual state (or has not
            // looked yet, and will).
            let kept = self
                .keys
                .read()
                .get(&key)
                .is_some_and(|e| Arc::ptr_eq(&e.breaker, &breaker));
            if kept {
                return;
            }
        }
    }
}

/// One independent [`CircuitBreaker`](super::CircuitBreaker) per key; see
/// [`KeyedCircuitBreakerLayer`].
///
/// `poll_ready` only polls the inner service (the key is known only at `call`);
/// admission happens in `call`, and a rejected call fails at once with [`Open`](super::error::Open)
/// without reaching the inner service, whose readiness it gives back (the readied
/// service is swapped for a fresh clone, so a bulkhead permit it reserved is freed).
/// Each call reads the clock and takes the
/// key map's read lock once (its write lock only to add a key).
///
/// # Cancel safety
/// As [`ResponseFuture`].
pub struct KeyedCircuitBreaker<S, K, F, C = ErrorClassifier> {
    inner: S,
    keys: Arc<Keys<K>>,
    key_fn: F,
    classifier: C,
}

impl<S: Clone, K, F: Clone, C: Clone> Clone for KeyedCircuitBreaker<S, K, F, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            keys: self.keys.clone(),
            key_fn: self.key_fn.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<S: fmt::Debug, K, F, C> fmt::Debug for KeyedCircuitBreaker<S, K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreaker")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

// === impl KeyedCircuitBreaker ===

impl<S, K, F, C> KeyedCircuitBreaker<S, K, F, C> {
    /// A handle to the per-key breakers.
    pub fn handle(&self) -> KeyedCircuitBreakerHandle<K> {
        KeyedCircuitBreakerHandle {
            keys: self.keys.clone(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the breaker, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, K, F, C, Req> Service<Req> for KeyedCircuitBreaker<S, K, F, C>
where
    S: Service<Req> + Clone,
    K: Hash + Eq + Clone + fmt::Display,
    F: KeyFn<Req, K>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = Error<S::Error>;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = self.key_fn.key(&req);
        let mut now = Instant::now();
        let breaker = self.keys.get_timed(key, &mut now);
        match breaker.acquire(&mut Now::at(now)) {
            Ok(permit) => {
                // The guard first: if the inner `call` panics, it gives a probe slot back.
                let guard = Guard::new(breaker, permit);
                ResponseFuture::running(self.inner.call(req), guard, self.classifier.clone())
            }
            Err(open) => {
                // The key is known only now, after the inner service was made ready:
                // what its readiness reserved (a bulkhead permit) is given back by
                // dropping it for a fresh clone, not held until the next call (a retry
                // outside keeps this service through its backoff, so a dead key's
                // rejected calls would fill a bulkhead every key shares).
                self.inner = self.inner.clone();
                ResponseFuture::rejected(open)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call's slow-call clock starts after its key's breaker was found: when it had
    /// to be made (a window allocated, the write lock waited for, the map trimmed), the
    /// time is read again after that work, which is not the dependency's.
    #[tokio::test(start_paused = true)]
    async fn a_new_keys_call_is_timed_from_after_its_breaker_is_made() {
        let layer = super::super::CircuitBreakerLayer::builder()
            .keyed(|k: &u32| *k)
            .build()
            .unwrap();
        let keys = &layer.keys;
        let before = Instant::now();
        tokio::time::advance(Duration::from_millis(150)).await;
        let mut now = before;
        keys.get_timed(1, &mut now);
        assert_eq!(now, before + Duration::from_millis(150), "made: read again");
        let mut now = before;
        keys.get_timed(1, &mut now);
        assert_eq!(now, before, "found: the time read before is kept");
    }

    /// The key names the breaker in logs and metrics: no userinfo in it, and one key
    /// for a host whatever the spelling of its default port.
    #[cfg(feature = "http")]
    #[test]
    fn an_authority_key_has_no_userinfo_and_no_default_port() {
        let key = |uri: &str| {
            let req = http::Request::get(uri).body(()).unwrap();
            ByAuthority.key(&req).as_str().to_owned()
        };
        assert_eq!(key("https://svc:s3cret@api.test/x"), "api.test");
        assert_eq!(key("https://svc@api.test:8443/x"), "api.test:8443");
        assert_eq!(key("https://api.test:443/x"), "api.test");
        assert_eq!(key("http://api.test:80/x"), "api.test");
        assert_eq!(key("http://api.test:443/x"), "api.test:443");
        assert_eq!(key("https://API.test:8443/x"), "API.test:8443");
        assert_eq!(key("https://u:pw@:443/x"), "-");
        let mut req = http::Request::get("/x").body(()).unwrap();
        req.headers_mut()
            .insert(http::header::HOST, "u:p@api.test".parse().unwrap());
        assert_eq!(ByAuthority.key(&req).as_str(), "api.test");
    }
    use std::hash::Hasher;

    /// The same bytes hash the same however they are written (one call each, or in
    /// slices split anywhere), and one map finds its keys from any thread.
    #[test]
    fn the_buffered_hasher_is_consistent_across_writes_and_threads() {
        let build = BuildBuffered::default();
        let text = b"orders.internal:8080";
        let whole = {
            let mut h = build.build_hasher();
            h.write(text);
            h.finish()
        };
        for split in 0..text.len() {
            let mut h = build.build_hasher();
            h.write(&text[..split]);
            for &b in &text[split..] {
                h.write_u8(b);
            }
            assert_eq!(h.finish(), whole, "split at {split}");
        }
        let mut h = build.build_hasher();
        h.write(b"orders.internal:8081");
        assert_ne!(h.finish(), whole);

        let mut map: HashMap<http_free_key::Key, u32, BuildBuffered> = HashMap::default();
        map.insert(http_free_key::Key("Orders.Internal".into()), 7);
        let map = Arc::new(map);
        let other = std::thread::spawn({
            let map = map.clone();
            move || {
                map.get(&http_free_key::Key("orders.internal".into()))
                    .copied()
            }
        });
        assert_eq!(other.join().unwrap(), Some(7));
    }

    /// A key hashed like `http::uri::Authority`: lower-cased, one byte per call.
    mod http_free_key {
        #[derive(Debug)]
        pub(super) struct Key(pub(super) String);

        impl PartialEq for Key {
            fn eq(&self, other: &Self) -> bool {
                self.0.eq_ignore_ascii_case(&other.0)
            }
        }

        impl Eq for Key {}

        impl std::hash::Hash for Key {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                for b in self.0.bytes() {
                    state.write_u8(b.to_ascii_lowercase());
                }
            }
        }
    }
}
