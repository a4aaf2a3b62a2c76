//! Where the [`Idempotency`](super::Idempotency) layer remembers responses.

use super::fingerprint::Fingerprint;
use crate::BoxError;
use crate::clock::later;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// A remembered response: status, headers, the whole body and its trailers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The trailers, if the body ended with some (every gRPC response but a
    /// trailers-only one carries its `grpc-status` there). A shared store must keep
    /// them: a gRPC client reads a replayed response without them as a failure.
    pub trailers: Option<HeaderMap>,
    /// The request that first used the key (see [`Fingerprint`]): a repeat that differs
    /// is answered `422`. Of the head alone ([`Fingerprint::HEAD_ONLY`]) if the handler
    /// did not read the whole request body. `None` (a store written by an older
    /// version): repeats are not compared.
    pub fingerprint: Option<Fingerprint>,
}

/// Identifies one claim of a key.
///
/// A claim that outlives its `lock_for` can be taken over by a later request; the
/// token is how a store tells the two apart, so the first request's
/// [`complete`](IdempotencyStore::complete) or [`release`](IdempotencyStore::release)
/// cannot end its successor's claim (which would let a third request run the handler
/// at the same time). A shared store keeps it with the claim and compares it before it
/// writes or deletes (the owner token of a Redis lock: `SET key token NX PX`, then a
/// compare-and-delete).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimToken(pub u64);

impl ClaimToken {
    /// A random token, for stores shared between processes.
    pub fn random() -> Self {
        Self(fastrand::u64(..))
    }
}

/// The answer to [`IdempotencyStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[expect(
    clippy::large_enum_variant,
    reason = "one per keyed request; boxing would allocate for every replay"
)]
pub enum Claim {
    /// The key is now claimed by this caller, under this token: run the handler, then
    /// [`complete`](IdempotencyStore::complete) or [`release`](IdempotencyStore::release)
    /// with the token.
    Proceed(ClaimToken),
    /// Another request with this key is running: [`wait`](IdempotencyStore::wait), then
    /// claim again.
    InProgress,
    /// The key's response is remembered: answer with it.
    Done(StoredResponse),
}

/// A store of responses by idempotency key.
///
/// A key is *claimed* by the first request, which runs the handler and then
/// *completes* it with the response (or *releases* it to let a later request try).
/// Requests with a claimed key wait; requests with a completed key get the stored
/// response. A claim not completed (or [extended](IdempotencyStore::extend)) within
/// `lock_for` is abandoned and can be claimed again (a crashed handler must not block
/// its key forever); completing, releasing or extending then acts only on the claim the
/// [`ClaimToken`] names.
///
/// Implemented by [`MemoryStore`] and, with the `redis` feature, by `RedisStore`; a
/// shared store (Redis, a database) lets every instance of a service answer
/// duplicates.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for `lock_for`, or reports it in progress or done.
    ///
    /// # Errors
    /// The store is unreachable; the layer then runs the handler without
    /// de-duplication (fails open) and logs a warning. Not for a duplicate that
    /// already found the key in progress: it waits on, as if it still were.
    fn claim(
        &self,
        key: &str,
        lock_for: Duration,
    ) -> impl Future<Output = Result<Claim, BoxError>> + Send;

    /// Remembers `response` for `key` for `ttl`, ending the claim `token` and waking
    /// waiters. If another request holds the key (the claim expired and it claimed the
    /// key) or the key already has a response, nothing is stored. A claim that expired
    /// with the key free again may store it (as `RedisStore` does
    /// also after a takeover that was released since, which it cannot tell apart) or
    /// not ([`MemoryStore`] stores it only if no other request claimed the key since):
    /// the handler ran, so either is correct.
    ///
    /// # Errors
    /// The store is unreachable (or, for [`MemoryStore`], the answer is over its
    /// `max_bytes`); the response is still returned to the caller, but the claim is
    /// released unremembered: a repeat with the key runs the handler again, as after a
    /// `5xx`. A shared store should retry a blip itself before it answers an error.
    fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Gives up the claim `token` without a response (the handler failed, answered
    /// `5xx`, or was cancelled), waking waiters; a claim taken over by another request
    /// is left alone. Called from `Drop`, so it must not block; a remote store may rely
    /// on the claim expiring instead.
    fn release(&self, key: &str, token: ClaimToken);

    /// Extends the claim `token` on `key` to `lock_for` from now, while its handler
    /// still runs (the layer renews half-way through each `lock_for` while the client
    /// waits, so a handler slower than `lock_for` keeps its key). `false` if the claim
    /// was taken over or completed, or the store cannot extend claims: the default,
    /// with which a claim lasts `lock_for` and no longer.
    ///
    /// # Errors
    /// The store is unreachable; the layer tries again while more than an eighth of
    /// `lock_for` is left of the claim, then lets it run out.
    fn extend(
        &self,
        key: &str,
        token: ClaimToken,
        lock_for: Duration,
    ) -> impl Future<Output = Result<bool, BoxError>> + Send {
        let _ = (key, token, lock_for);
        std::future::ready(Ok(false))
    }

    /// Resolves when `key` may have stopped being in progress (completed, released,
    /// or its claim expired). The default polls every 50 ms; polled outside a Tokio
    /// runtime (the layer driven inline), where there is no timer, it yields once.
    ///
    /// A store of its own that overrides it and may be polled outside a runtime must
    /// not make a Tokio timer there (it panics).
    fn wait(&self, key: &str) -> impl Future<Output = ()> + Send {
        let _ = key;
        let sleep = tokio::runtime::Handle::try_current()
            .is_ok()
            .then(|| tokio::time::sleep(Duration::from_millis(50)));
        async move {
            match sleep {
                Some(sleep) => sleep.await,
                // Outside a runtime tokio wakes the task at once.
                None => tokio::task::yield_now().await,
            }
        }
    }
}

#[expect(
    clippy::large_enum_variant,
    reason = "a claim in progress is short-lived; most entries are responses"
)]
enum Entry {
    InProgress {
        until: Instant,
        token: ClaimToken,
        done: watch::Sender<()>,
    },
    Done {
        response: StoredResponse,
        expires: Instant,
    },
}

struct Inner {
    map: HashMap<String, Entry>,
    /// Completed keys by expiry, soonest first (a min-heap: with different TTLs, the
    /// oldest response is not always the first to expire).
    order: BinaryHeap<Reverse<(Instant, String)>>,
    /// The next claim's token.
    next_token: u64,
    /// The size of the remembered responses (see [`size_of`]).
    bytes: usize,
    /// Entries of `map` that are claims in progress (the rest are remembered responses).
    in_progress: usize,
    /// Whether a response was forgotten before its TTL yet (logged at `warn` once).
    warned: bool,
}

/// Counts (and logs, at `warn` the first time) a response forgotten before its TTL for
/// want of room.
#[cold]
fn forgotten_early(warned: &mut bool, reason: &'static str) {
    // One literal label per arm: a label that is an expression makes the macro build
    // (allocate) its label list on every call, and a full store sheds on every claim.
    let counter = if reason == "bytes" {
        metrics::counter!("postbox_idempotency_forgotten_total", "reason" => "bytes")
    } else {
        metrics::counter!("postbox_idempotency_forgotten_total", "reason" => "capacity")
    };
    counter.increment(1);
    if *warned {
        tracing::debug!(
            reason,
            "idempotency store full: a response forgotten before its TTL"
        );
    } else {
        *warned = true;
        tracing::warn!(
            reason,
            "idempotency store full: a response forgotten before its TTL (a repeat of its \
             key would run the handler again); raise the store's capacity or max_bytes, \
             or use a shared store"
        );
    }
}

/// About how much memory a remembered response under `key` holds: its body, headers
/// and trailers, and the key.
fn size_of(key: &str, r: &StoredResponse) -> usize {
    let fields =
        |h: &HeaderMap| -> usize { h.iter().map(|(n, v)| n.as_str().len() + v.len()).sum() };
    key.len() + r.body.len() + fields(&r.headers) + r.trailers.as_ref().map_or(0, fields)
}

/// An in-memory [`IdempotencyStore`], bounded in entries and in bytes, with TTL
/// eviction.
///
/// When full (in remembered responses, or in their bytes: 256 MiB by default, see
/// [`max_bytes`](Self::max_bytes)), expired responses are dropped first, then those
/// that expire soonest (the oldest, when every response has the same TTL). Claims in progress are never evicted and come on top of the
/// capacity (they are as many as the requests in flight): counted in it, a burst of
/// slow requests evicted every remembered response, and the retries of those requests
/// ran their handlers again. Times come from `tokio::time::Instant`, so paused-time
/// tests control expiry. Remembers responses for one process only.
///
/// A response forgotten before its TTL is counted in
/// `postbox_idempotency_forgotten_total{reason="capacity"|"bytes"}` (and the first one
/// logged at `warn`): a repeat of its key runs the handler again. Size the store for
/// every key of the span a deferred request may be replayed in (the enqueue layer's
/// `ttl`, 24 h by default), or use a shared store.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    capacity: usize,
    max_bytes: usize,
}

// === impl MemoryStore ===

impl MemoryStore {
    /// A store of at most `capacity` remembered responses (at least 1), besides the
    /// claims in progress.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: BinaryHeap::new(),
                next_token: 0,
                bytes: 0,
                in_progress: 0,
                warned: false,
            }),
            capacity: capacity.max(1),
            max_bytes: Self::DEFAULT_MAX_BYTES,
        }
    }

    /// The default of [`max_bytes`](Self::max_bytes): 256 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 256 << 20;

    /// At most this many bytes of remembered responses (bodies, headers, trailers and
    /// keys; default 256 MiB): past it, the oldest are forgotten. Without it, a store of
    /// 10 000 keys with 1 MiB bodies may hold 10 GiB. A response larger than this on
    /// its own is not remembered.
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// The bytes of the remembered responses (see [`max_bytes`](Self::max_bytes)).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Keys currently stored (in progress or done, expired or not).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// `true` if no key is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // No invariant spans a panic: every critical section is a single map update.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for MemoryStore {
    /// 10 000 keys.
    fn default() -> Self {
        Self::new(10_000)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl Inner {
    /// Whether `key` is claimed under `token` (and not taken over since).
    fn holds(&self, key: &str, token: ClaimToken) -> bool {
        matches!(self.map.get(key), Some(Entry::InProgress { token: t, .. }) if *t == token)
    }

    /// Removes the remembered response of `key` if it is the one that `expires` then;
    /// whether it did.
    fn forget(&mut self, key: &str, expires: Instant) -> bool {
        if matches!(self.map.get(key), Some(Entry::Done { expires: e, .. }) if *e == expires)
            && let Some(Entry::Done { response, .. }) = self.map.remove(key)
        {
            self.bytes = self.bytes.saturating_sub(size_of(key, &response));
            return true;
        }
        false
    }

    /// Forgets, for want of room (`reason`), the response that expires soonest; `false`
    /// if none is left. One still within its TTL is counted and logged: a repeat of its
    /// key (a replay of a deferred request) would run the handler again.
    fn shed_one(&mut self, now: Instant, reason: &'static str) -> bool {
        let Some(Reverse((expires, key))) = self.order.pop() else {
            return false;
        };
        if self.forget(&key, expires) && expires > now {
            forgotten_early(&mut self.warned, reason);
        }
        true
    }

    /// Forgets the responses that expire soonest while over `max_bytes`.
    fn shed_bytes(&mut self, max_bytes: usize, now: Instant) {
        while self.bytes > max_bytes && self.shed_one(now, "bytes") {}
    }

    /// Forgets the responses that expire soonest while more than `max` are remembered.
    fn shed_count(&mut self, max: usize, now: Instant) {
        while self.map.len() - self.in_progress > max && self.shed_one(now, "capacity") {}
    }

    /// Drops what has expired at the front of `order`, to keep it short.
    fn drop_expired(&mut self, now: Instant) {
        while let Some(Reverse((expires, _))) = self.order.peek() {
            if *expires > now {
                break;
            }
            let Some(Reverse((expires, key))) = self.order.pop() else {
                break;
            };
            self.forget(&key, expires);
        }
    }
}

impl IdempotencyStore for MemoryStore {
    fn claim(
        &self,
        key: &str,
        lock_for: Duration,
    ) -> impl Future<Output = Result<Claim, BoxError>> + Send {
        let now = Instant::now();
        let mut inner = self.lock();
        let claim = match inner.map.get(key) {
            Some(Entry::Done { response, expires }) if *expires > now => {
                Claim::Done(response.clone())
            }
            Some(Entry::InProgress { until, .. }) if *until > now => Claim::InProgress,
            _ => {
                // What expired at the front goes, so keys only ever claimed again after
                // they expire do not grow `order` (each `complete` adds an entry). Room
                // for the answer is made when it is stored: a claim released without
                // one (a `5xx`, a refusal) would have forgotten a live answer for
                // nothing.
                inner.drop_expired(now);
                let (done, _) = watch::channel(());
                let token = ClaimToken(inner.next_token);
                inner.next_token += 1;
                let replaced = inner.map.insert(
                    key.to_owned(),
                    Entry::InProgress {
                        until: later(now, lock_for),
                        token,
                        done,
                    },
                );
                match replaced {
                    Some(Entry::Done { response, .. }) => {
                        // Expired, not yet evicted.
                        inner.bytes = inner.bytes.saturating_sub(size_of(key, &response));
                        inner.in_progress += 1;
                    }
                    None => inner.in_progress += 1,
                    // An expired claim taken over.
                    Some(Entry::InProgress { .. }) => {}
                }
                Claim::Proceed(token)
            }
        };
        drop(inner);
        std::future::ready(Ok(claim))
    }

    fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let size = size_of(key, &response);
        if size > self.max_bytes {
            // Storing it would shed every other remembered response, and then itself.
            return std::future::ready(Err(format!(
                "a response of {size} bytes is over the store's max_bytes ({})",
                self.max_bytes
            )
            .into()));
        }
        let now = Instant::now();
        let expires = later(now, ttl);
        let mut inner = self.lock();
        if inner.holds(key, token) {
            inner.bytes += size;
            inner.in_progress -= 1;
            inner
                .map
                .insert(key.to_owned(), Entry::Done { response, expires });
            inner.order.push(Reverse((expires, key.to_owned())));
            // Room for it: the answers that expire soonest go.
            inner.shed_count(self.capacity, now);
            inner.shed_bytes(self.max_bytes, now);
        }
        drop(inner);
        std::future::ready(Ok(()))
    }

    fn release(&self, key: &str, token: ClaimToken) {
        let mut inner = self.lock();
        if inner.holds(key, token) {
            inner.map.remove(key);
            inner.in_progress -= 1;
        }
    }

    fn extend(
        &self,
        key: &str,
        token: ClaimToken,
        lock_for: Duration,
    ) -> impl Future<Output = Result<bool, BoxError>> + Send {
        let now = Instant::now();
        let mut inner = self.lock();
        let extended = match inner.map.get_mut(key) {
            Some(Entry::InProgress {
                until, token: t, ..
            }) if *t == token && *until > now => {
                *until = later(now, lock_for);
                true
            }
            _ => false,
        };
        drop(inner);
        std::future::ready(Ok(extended))
    }

    fn wait(&self, key: &str) -> impl Future<Output = ()> + Send {
        let waiting = match self.lock().map.get(key) {
            Some(Entry::InProgress { until, done, .. }) => Some((*until, done.subscribe())),
            _ => None,
        };
        async move {
            if let Some((until, mut rx)) = waiting {
                // Resolves when the claim's sender is dropped (completed or released).
                if tokio::runtime::Handle::try_current().is_ok() {
                    let _ = tokio::time::timeout_at(until, rx.changed()).await;
                } else {
                    // No timer without a runtime (the layer run inline): the claim
                    // ends with its work, which runs inline too.
                    let _ = rx.changed().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(n: u8) -> StoredResponse {
        StoredResponse {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![n]),
            trailers: None,
            fingerprint: None,
        }
    }

    /// A key claimed again each time after it expired does not grow the expiry order
    /// without bound: the expired entries at its front go on every claim.
    #[tokio::test(start_paused = true)]
    async fn keys_claimed_again_after_expiry_do_not_grow_the_order() {
        let s = MemoryStore::new(100);
        for _ in 0..1000 {
            let token = proceed(&s, "a", Duration::from_secs(5)).await;
            s.complete("a", token, response(1), Duration::from_secs(1))
                .await
                .unwrap();
            tokio::time::advance(Duration::from_secs(2)).await;
        }
        assert!(s.lock().order.len() <= 2, "{}", s.lock().order.len());
    }

    /// When full, the store drops what has expired before what has not, whatever was
    /// stored first: a long-lived response (a payment kept a day) is not evicted for
    /// room that expired short-lived ones leave. (Eviction went by completion order, so
    /// the day-long answer went first, and its retry ran the handler again.)
    #[tokio::test(start_paused = true)]
    async fn a_full_store_drops_expired_responses_before_live_older_ones() {
        let s = MemoryStore::new(2);
        let day = Duration::from_secs(86_400);
        let token = proceed(&s, "payment", day).await;
        s.complete("payment", token, response(1), day)
            .await
            .unwrap();
        let token = proceed(&s, "ping", day).await;
        s.complete("ping", token, response(2), Duration::from_secs(1))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        let token = proceed(&s, "other", day).await;
        s.complete("other", token, response(3), day).await.unwrap();
        assert!(matches!(
            s.claim("payment", day).await.unwrap(),
            Claim::Done(_)
        ));
    }

    /// Claims in progress do not push remembered responses out: counted in the
    /// capacity, a burst of slow requests evicted every remembered response, and their
    /// retries ran the handler again.
    #[tokio::test(start_paused = true)]
    async fn claims_in_progress_do_not_evict_remembered_responses() {
        let s = MemoryStore::new(2);
        let lock = Duration::from_secs(30);
        let ttl = Duration::from_secs(60);
        let _a = proceed(&s, "a", lock).await;
        let b = proceed(&s, "b", lock).await;
        let c = proceed(&s, "c", lock).await;
        s.complete("c", c, response(3), ttl).await.unwrap();
        let _d = proceed(&s, "d", lock).await;
        let _e = proceed(&s, "e", lock).await;
        assert!(matches!(s.claim("c", lock).await.unwrap(), Claim::Done(_)));
        // Released and completed claims leave the count right: two responses fit.
        s.release("b", b);
        let f = proceed(&s, "f", lock).await;
        s.complete("f", f, response(6), ttl).await.unwrap();
        assert!(matches!(s.claim("c", lock).await.unwrap(), Claim::Done(_)));
        assert!(matches!(s.claim("f", lock).await.unwrap(), Claim::Done(_)));
        let g = proceed(&s, "g", lock).await;
        s.complete("g", g, response(7), ttl).await.unwrap();
        assert!(
            matches!(s.claim("c", lock).await.unwrap(), Claim::Proceed(_)),
            "the oldest of three responses stays past a capacity of two"
        );
        assert_eq!(s.lock().in_progress, 4, "a, d, e and c again");
    }

    /// Claims `key`, which must be free.
    async fn proceed(s: &MemoryStore, key: &str, lock: Duration) -> ClaimToken {
        match s.claim(key, lock).await.unwrap() {
            Claim::Proceed(token) => token,
            other => panic!("{key} not free: {other:?}"),
        }
    }

    /// Past `max_bytes`, the oldest remembered responses are forgotten (10 000 keys of
    /// 1 MiB bodies could hold 10 GiB); the count follows evictions and expiry.
    #[tokio::test(start_paused = true)]
    async fn the_oldest_responses_go_past_the_byte_budget() {
        let s = MemoryStore::new(100).max_bytes(2500);
        let lock = Duration::from_secs(30);
        let ttl = Duration::from_secs(60);
        let big = |n: u8| StoredResponse {
            body: Bytes::from(vec![n; 1000]),
            ..response(n)
        };
        for (i, key) in ["a", "b", "c"].into_iter().enumerate() {
            let token = proceed(&s, key, lock).await;
            s.complete(key, token, big(i as u8), ttl).await.unwrap();
        }
        assert_eq!(s.bytes(), 2002, "a went to make room for c");
        assert!(matches!(
            s.claim("a", lock).await.unwrap(),
            Claim::Proceed(_)
        ));
        assert!(matches!(s.claim("b", lock).await.unwrap(), Claim::Done(_)));
        assert!(matches!(s.claim("c", lock).await.unwrap(), Claim::Done(_)));
        tokio::time::advance(ttl).await;
        // Replaces an expired response, and drops the other expired one too.
        let token = proceed(&s, "b", lock).await;
        assert_eq!(s.bytes(), 0);
        s.release("b", token);
    }

    /// A response larger than the whole byte budget is refused (the claim stays for the
    /// caller to release) and sheds nothing: it used to push every other remembered
    /// response out, and then itself.
    #[tokio::test(start_paused = true)]
    async fn a_response_over_the_whole_budget_is_refused_and_sheds_nothing() {
        let s = MemoryStore::new(100).max_bytes(1500);
        let lock = Duration::from_secs(30);
        let ttl = Duration::from_secs(60);
        let sized = |n: u8, len: usize| StoredResponse {
            body: Bytes::from(vec![n; len]),
            ..response(n)
        };
        let token = proceed(&s, "a", lock).await;
        s.complete("a", token, sized(1, 1000), ttl).await.unwrap();
        let before = s.bytes();
        let token = proceed(&s, "huge", lock).await;
        let e = s.complete("huge", token, sized(2, 2000), ttl).await;
        assert!(e.unwrap_err().to_string().contains("max_bytes"));
        assert_eq!(s.bytes(), before);
        assert!(matches!(s.claim("a", lock).await.unwrap(), Claim::Done(_)));
        s.release("huge", token);
        assert!(matches!(
            s.claim("huge", lock).await.unwrap(),
            Claim::Proceed(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn claim_complete_replay_and_expire() {
        let s = MemoryStore::new(10);
        let lock = Duration::from_secs(30);
        let token = proceed(&s, "k", lock).await;
        assert_eq!(s.claim("k", lock).await.unwrap(), Claim::InProgress);
        s.complete("k", token, response(1), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(s.claim("k", lock).await.unwrap(), Claim::Done(response(1)));
        tokio::time::advance(Duration::from_secs(61)).await;
        proceed(&s, "k", lock).await;
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_claims_expire_and_released_claims_free_the_key() {
        let s = MemoryStore::new(10);
        let lock = Duration::from_secs(5);
        proceed(&s, "k", lock).await;
        tokio::time::advance(Duration::from_secs(6)).await;
        let token = proceed(&s, "k", lock).await;
        s.release("k", token);
        proceed(&s, "k", lock).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_taken_over_cannot_release_or_complete_its_successors_claim() {
        let s = MemoryStore::new(10);
        let lock = Duration::from_secs(5);
        let first = proceed(&s, "k", lock).await;
        tokio::time::advance(Duration::from_secs(6)).await;
        let second = proceed(&s, "k", lock).await;
        assert_ne!(first, second);
        // The first request fails late: the second still holds the key.
        s.release("k", first);
        assert_eq!(s.claim("k", lock).await.unwrap(), Claim::InProgress);
        // Or answers late: its response does not end the second's claim either.
        s.complete("k", first, response(1), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(s.claim("k", lock).await.unwrap(), Claim::InProgress);
        s.complete("k", second, response(2), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(s.claim("k", lock).await.unwrap(), Claim::Done(response(2)));
    }

    /// Claims made at once while the store is nearly full each find room; as they
    /// complete, the store still keeps at most `capacity` responses (it kept one per
    /// claim on top of it).
    #[tokio::test(start_paused = true)]
    async fn concurrent_claims_completing_keep_the_store_within_its_capacity() {
        let s = MemoryStore::new(2);
        let lock = Duration::from_secs(5);
        let ttl = Duration::from_secs(60);
        let a = proceed(&s, "a", lock).await;
        s.complete("a", a, response(0), ttl).await.unwrap();
        let mut claims = Vec::new();
        for k in ["b", "c", "d"] {
            claims.push((k, proceed(&s, k, lock).await));
        }
        for (k, token) in claims {
            tokio::time::advance(Duration::from_secs(1)).await;
            s.complete(k, token, response(1), ttl).await.unwrap();
        }
        assert_eq!(s.len(), 2);
        assert!(matches!(s.claim("d", lock).await.unwrap(), Claim::Done(_)));
        assert!(matches!(s.claim("c", lock).await.unwrap(), Claim::Done(_)));
    }

    /// A store of capacity 2 holding answers for `a` and `b` (60 s TTL), with the claim
    /// lock and TTL it used.
    async fn full_of_a_and_b() -> (MemoryStore, Duration, Duration) {
        let s = MemoryStore::new(2);
        let lock = Duration::from_secs(5);
        let ttl = Duration::from_secs(60);
        for k in ["a", "b"] {
            let token = proceed(&s, k, lock).await;
            s.complete(k, token, response(0), ttl).await.unwrap();
        }
        (s, lock, ttl)
    }

    #[tokio::test(start_paused = true)]
    async fn full_store_evicts_the_oldest_response() {
        let (s, lock, ttl) = full_of_a_and_b().await;
        let c = proceed(&s, "c", lock).await;
        assert!(matches!(s.claim("a", lock).await.unwrap(), Claim::Done(_)));
        s.complete("c", c, response(0), ttl).await.unwrap();
        assert_eq!(s.len(), 2);
        // "a" was evicted.
        proceed(&s, "a", lock).await;
    }

    /// A claim of a new key in a full store takes no room until its answer is stored:
    /// released without one (a `5xx`, a refusal), it leaves every remembered answer.
    /// (Room was made at the claim, and a live answer forgotten for nothing.)
    #[tokio::test(start_paused = true)]
    async fn a_claim_released_without_an_answer_forgets_nothing_in_a_full_store() {
        let (s, lock, _) = full_of_a_and_b().await;
        let x = proceed(&s, "x", lock).await;
        s.release("x", x);
        for k in ["a", "b"] {
            assert!(
                matches!(s.claim(k, lock).await.unwrap(), Claim::Done(_)),
                "{k}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_live_claim_is_extended_and_only_by_its_token() {
        let s = MemoryStore::new(10);
        let lock = Duration::from_secs(10);
        let first = proceed(&s, "k", lock).await;
        tokio::time::advance(Duration::from_secs(8)).await;
        assert!(s.extend("k", first, lock).await.unwrap());
        assert!(!s.extend("k", ClaimToken(first.0 + 1), lock).await.unwrap());
        // Still claimed 10 s after the extension started, not after the claim did.
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(s.claim("k", lock).await.unwrap(), Claim::InProgress);
        tokio::time::advance(Duration::from_secs(2)).await;
        // Expired: neither extended nor kept.
        assert!(!s.extend("k", first, lock).await.unwrap());
        let second = proceed(&s, "k", lock).await;
        assert_ne!(first, second);
        assert!(!s.extend("k", first, lock).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_when_the_claim_completes() {
        let s = std::sync::Arc::new(MemoryStore::new(10));
        let token = proceed(&s, "k", Duration::from_secs(30)).await;
        let wait = s.wait("k");
        let s2 = s.clone();
        let completes = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            s2.complete("k", token, response(2), Duration::from_secs(60))
                .await
                .unwrap();
        });
        let start = Instant::now();
        wait.await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        completes.await.unwrap();
    }
}
