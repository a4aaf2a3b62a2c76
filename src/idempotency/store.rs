//! Where the [`Idempotency`](super::Idempotency) layer remembers responses.

use crate::BoxError;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// A remembered response: status, headers and the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// The answer to [`IdempotencyStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// The key is now claimed by this caller: run the handler, then
    /// [`complete`](IdempotencyStore::complete) or [`release`](IdempotencyStore::release).
    Proceed,
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
/// response. A claim not completed within `lock_for` is abandoned and can be claimed
/// again (a crashed handler must not block its key forever).
///
/// Implemented by [`MemoryStore`]; a shared store (Redis, a database) lets every
/// instance of a service answer duplicates.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for `lock_for`, or reports it in progress or done.
    ///
    /// # Errors
    /// The store is unreachable; the layer then runs the handler without
    /// de-duplication (fails open) and logs a warning.
    fn claim(
        &self,
        key: &str,
        lock_for: Duration,
    ) -> impl Future<Output = Result<Claim, BoxError>> + Send;

    /// Remembers `response` for `key` for `ttl`, ending the claim and waking waiters.
    ///
    /// # Errors
    /// The store is unreachable; the response is still returned to the caller.
    fn complete(
        &self,
        key: &str,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Gives up a claim without a response (the handler failed, answered `5xx`, or
    /// was cancelled), waking waiters. Called from `Drop`, so it must not block; a
    /// remote store may rely on the claim expiring instead.
    fn release(&self, key: &str);

    /// Resolves when `key` may have stopped being in progress (completed, released,
    /// or its claim expired). The default polls every 50 ms.
    fn wait(&self, key: &str) -> impl Future<Output = ()> + Send {
        let _ = key;
        tokio::time::sleep(Duration::from_millis(50))
    }
}

enum Entry {
    InProgress {
        until: Instant,
        done: watch::Sender<()>,
    },
    Done {
        response: StoredResponse,
        expires: Instant,
    },
}

struct Inner {
    map: HashMap<String, Entry>,
    /// Completed keys in completion order (so in expiry order, for one TTL).
    order: VecDeque<(String, Instant)>,
}

/// An in-memory [`IdempotencyStore`], bounded in entries, with TTL eviction.
///
/// When full, expired responses are dropped first, then the oldest remembered ones;
/// claims in progress are never evicted. Times come from `tokio::time::Instant`, so
/// paused-time tests control expiry. Remembers responses for one process only.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    capacity: usize,
}

// === impl MemoryStore ===

impl MemoryStore {
    /// A store of at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            capacity: capacity.max(1),
        }
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
            .finish()
    }
}

impl Inner {
    /// Makes room for one more key.
    fn evict(&mut self, capacity: usize, now: Instant) {
        while self.map.len() >= capacity {
            let Some((key, expires)) = self.order.pop_front() else {
                return; // only claims in progress: allowed to exceed
            };
            let same =
                matches!(self.map.get(&key), Some(Entry::Done { expires: e, .. }) if *e == expires);
            if same {
                self.map.remove(&key);
            }
        }
        // Also drop what has expired at the front, to keep `order` short.
        while let Some((key, expires)) = self.order.front() {
            if *expires > now {
                break;
            }
            let (key, expires) = (key.clone(), *expires);
            self.order.pop_front();
            if matches!(self.map.get(&key), Some(Entry::Done { expires: e, .. }) if *e == expires) {
                self.map.remove(&key);
            }
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
            existing => {
                if existing.is_none() {
                    inner.evict(self.capacity, now);
                }
                let (done, _) = watch::channel(());
                inner.map.insert(
                    key.to_owned(),
                    Entry::InProgress {
                        until: now + lock_for,
                        done,
                    },
                );
                Claim::Proceed
            }
        };
        drop(inner);
        std::future::ready(Ok(claim))
    }

    fn complete(
        &self,
        key: &str,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let expires = Instant::now() + ttl;
        let mut inner = self.lock();
        inner
            .map
            .insert(key.to_owned(), Entry::Done { response, expires });
        inner.order.push_back((key.to_owned(), expires));
        drop(inner);
        std::future::ready(Ok(()))
    }

    fn release(&self, key: &str) {
        let mut inner = self.lock();
        if matches!(inner.map.get(key), Some(Entry::InProgress { .. })) {
            inner.map.remove(key);
        }
    }

    fn wait(&self, key: &str) -> impl Future<Output = ()> + Send {
        let waiting = match self.lock().map.get(key) {
            Some(Entry::InProgress { until, done }) => Some((*until, done.subscribe())),
            _ => None,
        };
        async move {
            if let Some((until, mut rx)) = waiting {
                // Resolves when the claim's sender is dropped (completed or released).
                let _ = tokio::time::timeout_at(until, rx.changed()).await;
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
        }
    }

    #[tokio::test(start_paused = true)]
    async fn claim_complete_replay_and_expire() {
        let s = MemoryStore::new(10);
        let lock = Duration::from_secs(30);
        assert_eq!(s.claim("k", lock).await.unwrap(), Claim::Proceed);
        assert_eq!(s.claim("k", lock).await.unwrap(), Claim::InProgress);
        s.complete("k", response(1), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(s.claim("k", lock).await.unwrap(), Claim::Done(response(1)));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(s.claim("k", lock).await.unwrap(), Claim::Proceed);
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_claims_expire_and_released_claims_free_the_key() {
        let s = MemoryStore::new(10);
        assert_eq!(
            s.claim("k", Duration::from_secs(5)).await.unwrap(),
            Claim::Proceed
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            s.claim("k", Duration::from_secs(5)).await.unwrap(),
            Claim::Proceed
        );
        s.release("k");
        assert_eq!(
            s.claim("k", Duration::from_secs(5)).await.unwrap(),
            Claim::Proceed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn full_store_evicts_the_oldest_response() {
        let s = MemoryStore::new(2);
        let lock = Duration::from_secs(5);
        let ttl = Duration::from_secs(60);
        for k in ["a", "b"] {
            s.claim(k, lock).await.unwrap();
            s.complete(k, response(0), ttl).await.unwrap();
        }
        s.claim("c", lock).await.unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.claim("a", lock).await.unwrap(),
            Claim::Proceed,
            "a was evicted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_when_the_claim_completes() {
        let s = std::sync::Arc::new(MemoryStore::new(10));
        s.claim("k", Duration::from_secs(30)).await.unwrap();
        let wait = s.wait("k");
        let s2 = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            s2.complete("k", response(2), Duration::from_secs(60))
                .await
                .unwrap();
        });
        let start = Instant::now();
        wait.await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
