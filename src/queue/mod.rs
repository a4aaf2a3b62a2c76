//! Durable queues for deferred requests: the [`Queue`] trait and its backends.
//!
//! A queue stores [`Envelope`]s. Delivery is at least once: a message is *leased* for a
//! while, and comes back to pending if the lease is not acked in time. The envelope's
//! idempotency key makes the *effect* exactly once (see the `Idempotency` server layer).
//!
//! Times are wall-clock ([`SystemTime`]), since messages outlive the process.
//!
//! | backend | feature | durable | use |
//! |---|---|---|---|
//! | [`MemoryQueue`] | always | **no** | tests only |
//! | `EmbeddedQueue` | `embedded` (default) | yes: redb, fsync per group commit | the default |
//! | `RedisQueue` | `redis` | with `appendfsync always` | Redis Streams |
//! | `NatsQueue` | `nats` | stored on ack; fsync per `sync_interval` | NATS JetStream |
//! | `AmqpQueue` | `amqp` | yes: publisher confirms on quorum queues | RabbitMQ |
//!
//! The envelope's byte layout is specified in `docs/envelope.md`.
//!
//! # Example
//! ```
//! use postbox::queue::{DeferReason, Envelope, MemoryQueue, Queue};
//! use std::time::{Duration, SystemTime};
//!
//! # tokio_test::block_on(async {
//! let queue = MemoryQueue::new(); // not durable: tests only
//! let receipt = queue
//!     .enqueue(Envelope::new("api:443", "POST", "https://api/x", "{}", DeferReason::BulkheadFull))
//!     .await?;
//! for leased in queue.lease(16, Duration::from_secs(30), SystemTime::now()).await? {
//!     assert_eq!(leased.envelope.id, receipt.id());
//!     queue.ack(&[leased.token]).await?;
//! }
//! # Ok::<_, postbox::queue::QueueError>(()) }).unwrap();
//! ```

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "embedded")]
pub mod embedded;
pub mod envelope;
#[cfg(any(feature = "amqp", feature = "nats"))]
mod hold;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;

#[cfg(feature = "amqp")]
pub use self::amqp::{AmqpOptions, AmqpQueue};
#[cfg(feature = "embedded")]
pub use self::embedded::{EmbeddedOptions, EmbeddedQueue, EmbeddedStats};
pub use self::envelope::{DecodeError, DeferReason, Envelope, MessageId};
pub use self::memory::MemoryQueue;
#[cfg(feature = "nats")]
pub use self::nats::{NatsOptions, NatsQueue};
#[cfg(feature = "redis")]
pub use self::redis::{RedisOptions, RedisQueue};

use std::fmt;
use std::future::Future;
use std::time::{Duration, SystemTime};

/// The result of a successful [`Queue::enqueue`]: the message is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Enqueued {
    /// Stored as a new message.
    Stored(MessageId),
    /// A message with the same idempotency key is already pending or in flight; it was
    /// not stored twice. Carries the id of the message already stored.
    Duplicate(MessageId),
}

impl Enqueued {
    /// The id of the stored message (new or existing).
    pub fn id(&self) -> MessageId {
        match self {
            Enqueued::Stored(id) | Enqueued::Duplicate(id) => *id,
        }
    }
}

/// Proof of a lease: acking or retrying with a stale token (the lease expired and the
/// message was leased again) is refused with [`QueueError::LeaseLost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken {
    /// The leased message.
    pub id: MessageId,
    /// Which lease of that message this is (increases with every lease; a token whose
    /// generation is not the current lease's is stale).
    pub generation: u64,
}

/// A leased message.
#[derive(Debug, Clone)]
pub struct Leased {
    /// The message (with `attempts` already counting this delivery).
    pub envelope: Envelope,
    /// Needed to ack, retry or dead-letter it.
    pub token: LeaseToken,
    /// When the lease expires and the message returns to pending.
    pub lease_until: SystemTime,
}

/// How many messages are where.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Waiting to be leased (due or not yet due).
    pub pending: u64,
    /// Leased and not yet acked.
    pub in_flight: u64,
    /// Dead-lettered.
    pub dead: u64,
}

/// A dead-lettered message and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The message as it was last leased.
    pub envelope: Envelope,
    /// Why it was given up.
    pub reason: String,
}

/// Errors of a queue backend.
#[derive(Debug)]
#[non_exhaustive]
pub enum QueueError {
    /// The queue holds its configured maximum of messages: pending and in flight (on
    /// RabbitMQ, only the messages ready in its main queue: see its
    /// `AmqpOptions::with_capacity`).
    Full {
        /// The configured capacity.
        capacity: u64,
    },
    /// The lease expired (and the message may have been leased again).
    LeaseLost(LeaseToken),
    /// The stored data is corrupt or from an unknown format version.
    Corrupt(String),
    /// The backend is unreachable (connection lost, broker down).
    Unavailable(crate::BoxError),
    /// Any other backend error (I/O, database).
    Backend(crate::BoxError),
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Full { capacity } => write!(f, "queue full ({capacity} messages)"),
            QueueError::LeaseLost(t) => {
                write!(f, "lease {} of message {} lost", t.generation, t.id)
            }
            QueueError::Corrupt(m) => write!(f, "queue data corrupt: {m}"),
            QueueError::Unavailable(e) => write!(f, "queue unavailable: {e}"),
            QueueError::Backend(e) => write!(f, "queue backend error: {e}"),
        }
    }
}

impl std::error::Error for QueueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            QueueError::Unavailable(e) | QueueError::Backend(e) => Some(&**e),
            _ => None,
        }
    }
}

/// A durable store of deferred requests.
///
/// Every method's future is `Send`. Implementations: `MemoryQueue` (tests only, not
/// durable) and the embedded redb queue (feature `embedded`); brokers behind their
/// features.
pub trait Queue: Send + Sync + 'static {
    /// Stores `envelope`; when this returns `Ok` the message is durable (fsynced or
    /// acknowledged by the broker). A message whose idempotency key is already pending
    /// or in flight is not stored twice ([`Enqueued::Duplicate`]); an empty key is never
    /// de-duplicated. A key is compared as written: a blank one (`" "`, which the
    /// enqueue fallback never writes, and the replayer sends as no key) is a key here.
    /// Once a message is acked or dead-lettered its key is free again.
    ///
    /// To send a dead letter again, use
    /// [`redrive_dead_letters`](Self::redrive_dead_letters): enqueuing its envelope as
    /// it is (same id) is not a redrive, and the memory and embedded queues answer it
    /// [`Enqueued::Duplicate`] (the id is still stored, as a dead letter). The brokers
    /// differ here: NATS and RabbitMQ store it again (it is delivered again; on NATS
    /// not a keyless one within the stream's duplicate window, 2 min, of its first
    /// enqueue, which the server drops as a duplicate of its id), Redis
    /// answers `Stored` and `lease` may drop it unread: it skips the id of a message
    /// acked or dead-lettered only while it guards against a copy left by a retried
    /// enqueue (until it has read past the entries stored before that message was
    /// settled, and not at all if none was left), and delivers it again after that.
    fn enqueue(
        &self,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Enqueued, QueueError>> + Send;

    /// Leases up to `max` messages due at `now` (`not_before <= now`), oldest first
    /// (FIFO by id within a destination), each for `lease_for`. Expired leases are
    /// returned to pending first. Increments each message's `attempts`.
    ///
    /// "Oldest" is by id among the messages a lease looks at: the memory queue looks at
    /// all of them; the embedded queue at all that were due before, and at those that
    /// fell due since its last lease up to 1024 of them (or `max`, if more), earliest
    /// due first (so that a backlog that fell due at once is not rewritten in one
    /// transaction): past that, an older message that fell due later may come after
    /// newer ones; the brokers fetch from their stream or queue in the order they
    /// stored the messages, and hand out what they fetched and hold by id. These agree,
    /// within the embedded queue's bound, for envelopes enqueued as they were made (ids
    /// are UUIDv7, ordered by time); on a broker, an envelope kept a while before its
    /// enqueue may be leased after messages with newer ids stored before it.
    ///
    /// On NATS and RabbitMQ, a message given back with
    /// [`retry_later`](Self::retry_later) is published anew, so once due it comes
    /// after the messages of its destination that were queued meanwhile (the memory,
    /// embedded and Redis queues keep it in its place by id).
    ///
    /// Dropping the future does not withdraw the lease: what it took is leased to no
    /// one, and comes back when that lease ends (every backend).
    fn lease(
        &self,
        max: usize,
        lease_for: Duration,
        now: SystemTime,
    ) -> impl Future<Output = Result<Vec<Leased>, QueueError>> + Send;

    /// Acks delivered messages (one commit for the whole batch); they and their
    /// idempotency-key entries are removed.
    ///
    /// How soon an ack is durable is the backend's: the embedded queue syncs acks within
    /// [`ack_sync`](super::queue::EmbeddedOptions::with_ack_sync), and a broker's ack is
    /// its own (see "Choosing a queue" in the README). An ack lost in a crash delivers
    /// the message again; it never loses one.
    ///
    /// A stale token (its lease was lost, or the message is already acked) does not stop
    /// the others: every current token in the batch is acked, and the result is
    /// [`QueueError::LeaseLost`] naming the first stale one.
    fn ack(&self, tokens: &[LeaseToken]) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Returns a leased message to pending, not to be leased before `not_before`.
    fn retry_later(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Returns a leased message to pending *without counting this delivery*, not to be
    /// leased before `not_before`: for a delivery that never reached its destination
    /// (the replayer's circuit breaker rejected it), so an outage does not use up the
    /// message's attempts.
    ///
    /// The default counts the delivery (it is [`retry_later`](Self::retry_later)); every
    /// backend in this crate overrides it and does not. A released lease's token is
    /// stale afterwards, like any ended lease's.
    fn release(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        self.retry_later(token, not_before)
    }

    /// Moves a leased message to the dead letters with `reason`.
    fn dead_letter(
        &self,
        token: LeaseToken,
        reason: &str,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// How many messages are pending, in flight and dead.
    fn depth(&self) -> impl Future<Output = Result<Depth, QueueError>> + Send;

    /// Up to `max` dead letters, oldest first (inspection; they stay stored): by id in
    /// the memory and embedded queues, in the order they were dead-lettered on the
    /// brokers.
    ///
    /// A dead letter whose stored bytes cannot be decoded is skipped (and logged); it
    /// stays where a plain client of the backend can read it.
    fn dead_letters(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, QueueError>> + Send;

    /// Deletes the dead letters with these ids for good (ids as
    /// [`dead_letters`](Self::dead_letters) lists them); returns how many it deleted.
    /// An id that is not a dead letter (deleted already, or never dead) is ignored.
    ///
    /// The brokers can hold two dead letters with one id (an envelope enqueued again as
    /// it is after its dead letter is stored and delivered again, and can die again):
    /// there an id deletes as many of them as it is listed in `ids`, oldest first, so
    /// deleting what `dead_letters` returned deletes exactly that.
    ///
    /// The brokers look the ids up oldest first, so deleting what `dead_letters`
    /// returned is cheap; an id that is not there costs a scan of the dead letters.
    fn discard_dead_letters(
        &self,
        ids: &[MessageId],
    ) -> impl Future<Output = Result<u64, QueueError>> + Send;

    /// Moves up to `max` dead letters, oldest first (as [`dead_letters`](Self::dead_letters)
    /// lists them), back to pending: each is enqueued
    /// again as a copy with a new id, its attempts at 0 and its not-before kept (it is
    /// due at once), and its dead letter is then deleted. Returns how many were moved.
    ///
    /// A copy whose idempotency key is already pending or in flight is not stored twice
    /// ([`Enqueued::Duplicate`]); its dead letter is deleted all the same, as the live
    /// message carries the effect. If an enqueue fails (say [`QueueError::Full`]), the
    /// dead letters moved so far are deleted and the error is returned; the rest stay
    /// dead.
    ///
    /// At least once, like every delivery: a crash (or a lost reply) between the
    /// enqueue and the delete leaves the dead letter in place, and a second redrive
    /// enqueues it again. The idempotency key makes that harmless at a server with the
    /// `Idempotency` layer. Two redrives run at once can likewise both move the same
    /// dead letters.
    fn redrive_dead_letters(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<u64, QueueError>> + Send {
        async move {
            let dead = self.dead_letters(max).await?;
            let mut moved = Vec::with_capacity(dead.len());
            let mut failed = None;
            for DeadLetter { envelope, .. } in dead {
                let id = envelope.id;
                match self.enqueue(envelope.redriven()).await {
                    Ok(_) => moved.push(id),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let discarded = if moved.is_empty() {
                0
            } else {
                self.discard_dead_letters(&moved).await?
            };
            if discarded > 0 {
                tracing::info!(count = discarded, "postbox: dead letters redriven");
            }
            match failed {
                Some(e) => Err(e),
                None => Ok(discarded),
            }
        }
    }
}

/// The ids a `discard_dead_letters` looks for, each as many times as it was listed: a
/// broker can hold two dead letters with one id (an envelope enqueued again as it is
/// after its dead letter, stored and delivered again, dies again), and a redrive that
/// listed and moved both must delete both, or the next redrive sends it again.
#[cfg(any(feature = "redis", feature = "nats", feature = "amqp"))]
pub(crate) struct WantedIds<K>(std::collections::HashMap<K, usize>);

#[cfg(any(feature = "redis", feature = "nats", feature = "amqp"))]
impl<K: std::hash::Hash + Eq> WantedIds<K> {
    pub(crate) fn new(ids: impl IntoIterator<Item = K>) -> Self {
        let mut wanted = std::collections::HashMap::new();
        for id in ids {
            *wanted.entry(id).or_insert(0) += 1;
        }
        Self(wanted)
    }

    /// Whether `id` is still wanted; if so, counts one of it as found.
    pub(crate) fn take<Q>(&mut self, id: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        match self.0.get_mut(id) {
            Some(1) => self.0.remove(id).is_some(),
            Some(n) => {
                *n -= 1;
                true
            }
            None => false,
        }
    }

    /// Whether every id was found as often as it was listed.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `t + d`, or a time far in the future (year 2554, where the embedded queue's
/// nanosecond timestamps saturate) if that overflows.
pub(crate) fn saturating_add(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d)
        .unwrap_or_else(|| SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::MAX))
}

/// A broker URL: the one given, else the environment variable `env`, else `default`.
#[cfg(any(feature = "nats", feature = "redis", feature = "amqp"))]
fn broker_url(explicit: Option<&str>, env: &str, default: &str) -> String {
    explicit
        .map(str::to_owned)
        .or_else(|| std::env::var(env).ok())
        .unwrap_or_else(|| default.to_owned())
}
