//! [`MemoryQueue`]: an in-process queue for tests. **Not durable.**
//!
//! # Example
//! ```
//! use postbox::queue::{DeferReason, Envelope, MemoryQueue, Queue};
//! use std::time::{Duration, SystemTime};
//!
//! # tokio_test::block_on(async {
//! let queue = MemoryQueue::new();
//! let env = Envelope::new("api:443", "POST", "https://api/orders", "{}", DeferReason::CircuitOpen);
//! let receipt = queue.enqueue(env).await?;
//! let leased = queue.lease(10, Duration::from_secs(30), SystemTime::now()).await?;
//! assert_eq!(leased[0].envelope.id, receipt.id());
//! queue.ack(&[leased[0].token]).await?;
//! assert_eq!(queue.depth().await?.pending, 0);
//! # Ok::<_, postbox::queue::QueueError>(()) }).unwrap();
//! ```

use super::{
    DeadLetter, Depth, Enqueued, Envelope, LeaseToken, Leased, MessageId, Queue, QueueError,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::{Future, ready};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// An in-memory [`Queue`] with the full semantics of the trait — leases with
/// generations, expiry, `not_before`, idempotency-key de-duplication, dead letters, an
/// optional capacity.
///
/// # Not durable
///
/// **Everything is lost when the process exits.** An `Ok` from
/// [`enqueue`](Queue::enqueue) here does *not* mean the message survives a crash, which
/// breaks the promise of `EnqueueFallback` ("a receipt means the message is stored").
/// Use it in tests, never in production; the durable default is the embedded queue
/// (feature `embedded`).
///
/// # Clone
///
/// Clones share the same queue (the state is behind an `Arc`).
#[derive(Debug, Clone, Default)]
pub struct MemoryQueue {
    inner: Arc<Mutex<State>>,
    capacity: Option<u64>,
}

/// The queue's state. The same structure as the embedded queue's tables.
#[derive(Debug, Default)]
struct State {
    /// Every stored message (pending, in flight or dead), with its current envelope.
    messages: HashMap<MessageId, Envelope>,
    /// Pending messages by `(not_before, id)`; promoted to `ready` once due.
    scheduled: BTreeSet<(SystemTime, MessageId)>,
    /// Pending messages that are due, by id (FIFO).
    ready: BTreeSet<MessageId>,
    /// Leased messages: id → (lease_until, generation).
    in_flight: HashMap<MessageId, (SystemTime, u64)>,
    /// Lease expiry index: `(lease_until, id)`.
    expiry: BTreeSet<(SystemTime, MessageId)>,
    /// Dead letters: id → reason, oldest id first.
    dead: BTreeMap<MessageId, String>,
    /// Idempotency key → id, for pending and in-flight messages.
    keys: HashMap<String, MessageId>,
    /// Leases made so far: the high half of every generation (as the embedded queue).
    seq: u64,
}

// === impl MemoryQueue ===

impl MemoryQueue {
    /// An empty, unbounded queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty queue holding at most `capacity` live (pending and in-flight) messages;
    /// beyond that [`enqueue`](Queue::enqueue) fails with [`QueueError::Full`]. Dead
    /// letters do not count.
    pub fn with_capacity(capacity: u64) -> Self {
        Self {
            inner: Arc::default(),
            capacity: Some(capacity),
        }
    }

    /// The stored envelope of `id` (pending, in flight or dead), if any.
    pub fn get(&self, id: MessageId) -> Option<Envelope> {
        self.state().messages.get(&id).cloned()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock can only come from a bug in this file (no user
        // code runs under it); the state is still the best we have.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn live(&self) -> u64 {
        (self.scheduled.len() + self.ready.len() + self.in_flight.len()) as u64
    }

    fn enqueue(
        &mut self,
        envelope: Envelope,
        capacity: Option<u64>,
    ) -> Result<Enqueued, QueueError> {
        // Refused as every durable queue refuses it, so a test on this queue sees it.
        envelope.check_encodable()?;
        if !envelope.idempotency_key.is_empty()
            && let Some(&existing) = self.keys.get(&envelope.idempotency_key)
        {
            return Ok(Enqueued::Duplicate(existing));
        }
        if self.messages.contains_key(&envelope.id) {
            return Ok(Enqueued::Duplicate(envelope.id));
        }
        if let Some(capacity) = capacity
            && self.live() >= capacity
        {
            return Err(QueueError::Full { capacity });
        }
        let id = envelope.id;
        if !envelope.idempotency_key.is_empty() {
            self.keys.insert(envelope.idempotency_key.clone(), id);
        }
        self.scheduled.insert((envelope.not_before, id));
        self.messages.insert(id, envelope);
        Ok(Enqueued::Stored(id))
    }

    /// Returns expired leases to pending, then promotes due scheduled messages.
    fn reclaim(&mut self, now: SystemTime) {
        while let Some(&(until, id)) = self.expiry.first() {
            if until > now {
                break;
            }
            self.expiry.pop_first();
            self.in_flight.remove(&id);
            self.ready.insert(id);
        }
        while let Some(&(nb, id)) = self.scheduled.first() {
            if nb > now {
                break;
            }
            self.scheduled.pop_first();
            self.ready.insert(id);
        }
    }

    fn lease(&mut self, max: usize, lease_for: Duration, now: SystemTime) -> Vec<Leased> {
        self.reclaim(now);
        let lease_until = super::saturating_add(now, lease_for);
        let mut out = Vec::with_capacity(max.min(self.ready.len()));
        while out.len() < max {
            let Some(id) = self.ready.pop_first() else {
                break;
            };
            let Some(env) = self.messages.get_mut(&id) else {
                continue;
            };
            if env.not_before > now {
                // Made ready by a lease with a later `now`: not due for this one.
                self.scheduled.insert((env.not_before, id));
                continue;
            }
            env.attempts = env.attempts.saturating_add(1);
            let generation = self.seq << 32 | u64::from(env.attempts);
            self.seq += 1;
            self.in_flight.insert(id, (lease_until, generation));
            self.expiry.insert((lease_until, id));
            out.push(Leased {
                envelope: env.clone(),
                token: LeaseToken { id, generation },
                lease_until,
            });
        }
        out
    }

    /// Ends the lease of `token` if it is current.
    fn release(&mut self, token: LeaseToken) -> Result<(), QueueError> {
        match self.in_flight.get(&token.id) {
            Some(&(until, generation)) if generation == token.generation => {
                self.in_flight.remove(&token.id);
                self.expiry.remove(&(until, token.id));
                Ok(())
            }
            _ => Err(QueueError::LeaseLost(token)),
        }
    }

    fn forget_key(&mut self, id: MessageId) {
        if let Some(env) = self.messages.get(&id)
            && self.keys.get(&env.idempotency_key) == Some(&id)
        {
            self.keys.remove(&env.idempotency_key);
        }
    }

    fn ack(&mut self, tokens: &[LeaseToken]) -> Result<(), QueueError> {
        let mut lost = None;
        for &token in tokens {
            match self.release(token) {
                Ok(()) => {
                    self.forget_key(token.id);
                    self.messages.remove(&token.id);
                }
                Err(e) => {
                    lost.get_or_insert(e);
                }
            }
        }
        lost.map_or(Ok(()), Err)
    }

    fn retry_later(
        &mut self,
        token: LeaseToken,
        not_before: SystemTime,
        counted: bool,
    ) -> Result<(), QueueError> {
        self.release(token)?;
        if let Some(env) = self.messages.get_mut(&token.id) {
            env.not_before = not_before;
            if !counted {
                env.attempts = env.attempts.saturating_sub(1);
            }
        }
        self.scheduled.insert((not_before, token.id));
        Ok(())
    }

    fn dead_letter(&mut self, token: LeaseToken, reason: &str) -> Result<(), QueueError> {
        self.release(token)?;
        self.forget_key(token.id);
        self.dead.insert(token.id, reason.to_owned());
        Ok(())
    }

    fn depth(&self) -> Depth {
        Depth {
            pending: (self.scheduled.len() + self.ready.len()) as u64,
            in_flight: self.in_flight.len() as u64,
            dead: self.dead.len() as u64,
        }
    }

    fn discard_dead_letters(&mut self, ids: &[MessageId]) -> u64 {
        let mut discarded = 0;
        for id in ids {
            if self.dead.remove(id).is_some() {
                self.messages.remove(id);
                discarded += 1;
            }
        }
        discarded
    }

    fn dead_letters(&self, max: usize) -> Vec<DeadLetter> {
        self.dead
            .iter()
            .filter_map(|(id, reason)| {
                Some(DeadLetter {
                    envelope: self.messages.get(id)?.clone(),
                    reason: reason.clone(),
                })
            })
            .take(max)
            .collect()
    }
}

impl Queue for MemoryQueue {
    fn enqueue(
        &self,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Enqueued, QueueError>> + Send {
        ready(self.state().enqueue(envelope, self.capacity))
    }

    fn lease(
        &self,
        max: usize,
        lease_for: Duration,
        now: SystemTime,
    ) -> impl Future<Output = Result<Vec<Leased>, QueueError>> + Send {
        ready(Ok(self.state().lease(max, lease_for, now)))
    }

    fn ack(&self, tokens: &[LeaseToken]) -> impl Future<Output = Result<(), QueueError>> + Send {
        ready(self.state().ack(tokens))
    }

    fn retry_later(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        ready(self.state().retry_later(token, not_before, true))
    }

    fn release(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        ready(self.state().retry_later(token, not_before, false))
    }

    fn dead_letter(
        &self,
        token: LeaseToken,
        reason: &str,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        ready(self.state().dead_letter(token, reason))
    }

    fn depth(&self) -> impl Future<Output = Result<Depth, QueueError>> + Send {
        ready(Ok(self.state().depth()))
    }

    fn dead_letters(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, QueueError>> + Send {
        ready(Ok(self.state().dead_letters(max)))
    }

    fn discard_dead_letters(
        &self,
        ids: &[MessageId],
    ) -> impl Future<Output = Result<u64, QueueError>> + Send {
        ready(Ok(self.state().discard_dead_letters(ids)))
    }
}
