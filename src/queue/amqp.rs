//! [`AmqpQueue`]: a [`Queue`] on RabbitMQ quorum queues (feature `amqp`).
//!
//! # Example
//! ```no_run
//! use postbox::queue::{AmqpOptions, AmqpQueue, DeferReason, Envelope, Queue};
//! use std::time::{Duration, SystemTime};
//!
//! # async fn run() -> Result<(), postbox::queue::QueueError> {
//! // URL from `POSTBOX_AMQP_URL`, else amqp://guest:guest@127.0.0.1:5672/%2f
//! let queue = AmqpQueue::connect(AmqpOptions::new("orders")).await?;
//! let env = Envelope::new("api:443", "POST", "https://api/orders", "{}", DeferReason::CircuitOpen);
//! queue.enqueue(env).await?;
//! for leased in queue.lease(10, Duration::from_secs(30), SystemTime::now()).await? {
//!     queue.ack(&[leased.token]).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout in RabbitMQ
//!
//! A queue named `NAME` is three durable queues on the default exchange:
//!
//! | queue | type | holds |
//! |---|---|---|
//! | `postbox.NAME` | quorum | the live messages |
//! | `postbox.NAME.delay` | quorum, dead-letters back to `postbox.NAME` (at-least-once) | messages waiting for a not-before further away than the hold limit, each with a per-message TTL |
//! | `postbox.NAME.dead` | classic | the dead letters, oldest first |
//!
//! Every message is persistent (`delivery_mode` 2) and published with **publisher
//! confirms**: `enqueue` returns after the broker confirmed it, which for a quorum queue
//! means a majority of its replicas wrote it to their log and fsynced it. Publishes are
//! `mandatory`: one to a queue that was deleted (by hand) comes back unroutable, and is
//! an error, where it would otherwise be confirmed and dropped. lapin hands a return to
//! whichever confirm of the channel comes next, not to its own publish's: a call is
//! answered as returned only for a return of its own message (`message-id` and
//! routing key), and another's return that comes with a call's confirm is published
//! again (the queues declared again first) on a task of its own, also when the call
//! was cancelled while it waited for the confirm, so the call it belonged to, answered
//! as confirmed, loses nothing. The body is the
//! versioned envelope (`docs/envelope.md`), `content-type`
//! `application/vnd.postbox.envelope`, `message-id` the UUID text, and the headers
//! `postbox-idempotency-key`, `postbox-destination` (long strings; left out when over
//! 4 KiB, which the envelope still holds),
//! `postbox-not-before`, `postbox-created-at` (Unix milliseconds), `postbox-attempts`;
//! a dead letter adds `postbox-reason` (cut to 4 KiB). A message that is not an
//! envelope goes to the dead letters as it is, its headers and main properties kept, with
//! `postbox-reason: undecodable: …` and its `message-id` in
//! `postbox-original-message-id`.
//!
//! # Leases
//!
//! A lease is a delivery (`basic.get`, manual ack) that *this process* holds unacked on
//! its channel. Gets, acks and nacks go over a connection that never publishes;
//! enqueues, and the copies a retry, a move or a dead letter makes, over a second one,
//! so a memory or disk alarm, which blocks a connection once it publishes, never stops
//! the leases (see `docs/queues.md`). Deadlines and not-before are judged against the `now` passed to
//! [`lease`](Queue::lease). If the connection or the process dies, RabbitMQ requeues
//! every unacked delivery at once and the next `lease` gets them again (their attempts
//! count that: quorum queues add `x-delivery-count`, less the deliveries this process
//! knows it held without a lease in progress when its connection dropped); the old
//! tokens are then
//! [`QueueError::LeaseLost`]. RabbitMQ closes a channel that holds a delivery longer than
//! its `consumer_timeout` (default 30 min): keep leases, and the hold limit, below it.
//!
//! A message whose not-before is at most the hold limit away
//! ([`AmqpOptions::with_hold_limit`], default 5 min) is held unacked until it is due;
//! one further away is moved to the delay queue with a per-message TTL, from which the
//! broker dead-letters it back when it is due. Per-message TTLs expire only at the head
//! of a queue, so a long delay can hold back a shorter one queued behind it (by at most
//! the difference). `retry_later` republishes the message with the new not-before and
//! attempts (to the main or the delay queue), then acks the delivery. `release` (a
//! delivery the replayer's breaker stopped) leaves the attempt uncounted: within the hold
//! limit the process simply keeps holding the delivery, sending nothing; beyond it the
//! message is parked like a retry, with the uncounted attempts. A delivery held without
//! a lease for longer than the hold limit (released again and again, or due and never
//! taken: more due than the replayer takes) is parked the same way (a due one after
//! the lease has taken what it takes), so none is held towards `consumer_timeout` (with the main
//! queue full, in the delay queue for what is left of its wait: it dead-letters back
//! at least once, when there is room). Every lease's token
//! generation is a per-process sequence number, so a released lease's token is stale.
//! `ack`, `retry_later`, `release` and `dead_letter` run to the end on a task of their
//! own even when their future is dropped (a timeout around them), so none leaves a
//! delivery it took out of the hold unacked on the channel.
//!
//! A process holds at most [`AmqpOptions::with_max_held`] deliveries. When that many are
//! held, fewer are due than the lease asks for and the main queue has ready messages
//! (besides copies moved before), a lease moves up to 16 of the held deliveries due
//! last to the main queue's tail (a copy with their not-before and attempts, then an
//! ack) and fetches what was behind them: retries scheduled for later never keep a
//! message that is due — for another destination, say — waiting long. While moving
//! brings nothing due (what is behind is other retries not yet due), the next move
//! waits 1 s, doubling up to 30 s, so the hold is not sent round on every poll.
//!
//! # De-duplication
//!
//! RabbitMQ has no de-duplication by key. This queue keeps an **in-process** index of
//! the idempotency keys it enqueued and has not yet acked or dead-lettered, so a
//! duplicate is caught when the same process enqueues it (the common case: one service
//! instance retrying one request), but not across processes or a restart. A second
//! enqueue of a key whose first is still waiting for its publisher confirm waits for
//! that outcome: `Duplicate` if the broker confirmed it, else it publishes its own. An entry is
//! forgotten when this process acks or dead-letters the message, and after
//! [`AmqpOptions::with_dedupe_window`] (default 24 h) in any case, even if its message
//! is still pending (one waiting out a long outage is then stored twice if enqueued
//! again), or earlier, oldest first, once the index holds 2^18 keys (its memory stays
//! bounded however many keys other processes ack). Reading the dead letters forgets the
//! keys held for them. The receiving service's `Idempotency` layer still makes the
//! effect exactly once.
//!
//! # Connection loss
//!
//! A call made while the broker is unreachable fails with [`QueueError::Unavailable`];
//! the next call connects again. An enqueue that failed that way may still have been
//! stored (the confirm was lost): retried, it is stored again (the failed publish gave
//! its key up from the in-process index), and the receiving service's idempotency layer
//! answers the two copies once. The index also keeps a key after another process acked
//! or dead-lettered its message (it cannot know), for up to its window: a request sent
//! again then under the same key is answered `Duplicate` and not stored.

use super::hold::{HeldState, MOVED_FOR, RoomPacer, due_last, leasable, settling, waiting};
use super::{
    DeadLetter, Depth, Enqueued, Envelope, LeaseToken, Leased, MessageId, Queue, QueueError,
};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ErrorKind};
use std::collections::{BTreeMap, HashMap, btree_map::Entry};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;

/// The environment variable that overrides the default URL.
pub const AMQP_URL_ENV: &str = "POSTBOX_AMQP_URL";
/// The URL used when neither [`AmqpOptions::with_url`] nor [`AMQP_URL_ENV`] is set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

const H_KEY: &str = "postbox-idempotency-key";
const H_DEST: &str = "postbox-destination";
const H_NOT_BEFORE: &str = "postbox-not-before";
const H_CREATED: &str = "postbox-created-at";
const H_ATTEMPTS: &str = "postbox-attempts";
const H_REASON: &str = "postbox-reason";
const CONTENT_TYPE: &str = "application/vnd.postbox.envelope";

/// The longest per-message TTL RabbitMQ takes, in milliseconds.
const MAX_TTL_MS: u32 = u32::MAX;

/// Where and how [`AmqpQueue::connect`] connects.
#[derive(Debug, Clone)]
pub struct AmqpOptions {
    name: String,
    url: Option<String>,
    capacity: Option<u64>,
    hold_limit: Duration,
    dedupe_window: Duration,
    max_held: usize,
    timeout: Duration,
    max_message_size: usize,
}

/// A durable [`Queue`] on RabbitMQ. See the [module docs](self) for the layout, the
/// lease model, de-duplication and durability.
///
/// # Clone
///
/// Clones share the two connections (one leases and settles, one publishes: see
/// `docs/queues.md` on memory and disk alarms), the lease table and the
/// de-duplication index.
#[derive(Clone)]
pub struct AmqpQueue {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    queue: String,
    delay_queue: String,
    dead_queue: String,
    capacity: Option<u64>,
    hold_limit: Duration,
    dedupe_window: Duration,
    max_held: usize,
    timeout: Duration,
    max_message_size: usize,
    /// The connection that leases and settles deliveries (gets, acks, nacks, depth).
    consumer: Slot,
    /// The connection that publishes: enqueues, and the copies a retry, a move or a
    /// dead letter makes of a delivery held on `consumer`. During a memory or disk
    /// alarm RabbitMQ stops reading from a connection once it publishes: on one
    /// connection, an enqueue blocked by the alarm stopped every lease and ack with
    /// it, and the replayer could not drain the backlog that raised the alarm.
    publisher: Slot,
    /// The last link's epoch (of either slot), kept when a failed link is dropped:
    /// epochs only grow, so a delivery held on a dead channel is never taken for one of
    /// the new channel, and an epoch names its slot.
    last_epoch: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
    keys: std::sync::Mutex<HashMap<String, Claim>>,
    /// Woken when a publish that an enqueue of its key waits for ends (stored or not).
    publish_ended: Notify,
    /// This `Inner` itself, for the tasks that publish returned messages again (see
    /// [`Inner::publish_returned_again`]).
    me: std::sync::Weak<Inner>,
    /// The channels (and their epochs) whose kept returns [`Inner::reap`] drains, and
    /// until when: named by a publish cancelled before its confirm was handed over (see
    /// [`Pending`]).
    reaping: std::sync::Mutex<Vec<(Channel, u64, Instant)>>,
}

/// A key's entry in the in-process de-duplication index.
struct Claim {
    id: MessageId,
    at: Instant,
    /// `true` once the broker confirmed the message. A claim not stored belongs to an
    /// enqueue still publishing: one that fails or is cancelled takes its claim out
    /// ([`ClaimGuard`]).
    stored: bool,
    /// An enqueue of the key waits for this publish to end: wake it then.
    waited: bool,
}

/// An enqueue's claim on its key while it publishes: [`confirm`](Self::confirm)ed once
/// the broker stored the message; dropped otherwise (a failure, or the enqueue
/// cancelled), it takes the claim out of the index. Either way an enqueue of the key
/// waiting for it is woken. (A claim is a few dozen bytes: the index holds up to
/// [`MAX_KEYS`] of them. A `watch` channel each, as before, took some 350 more: nine
/// `Notify`s.)
struct ClaimGuard<'a> {
    inner: &'a Inner,
    key: String,
    id: MessageId,
    confirmed: bool,
}

impl ClaimGuard<'_> {
    fn confirm(mut self) {
        let mut keys = self.inner.lock_keys();
        let waited = match keys.get_mut(&self.key) {
            Some(c) if c.id == self.id => {
                c.stored = true;
                std::mem::take(&mut c.waited)
            }
            _ => false,
        };
        drop(keys);
        self.confirmed = true;
        if waited {
            self.inner.publish_ended.notify_waiters();
        }
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        // Unconfirmed, the claim (if still this enqueue's) is not stored.
        if !self.confirmed {
            self.inner.forget_key(&self.key, self.id);
        }
    }
}

/// The most keys the de-duplication index keeps (a few tens of MB): past it, the
/// oldest confirmed ones are forgotten first.
const MAX_KEYS: usize = 1 << 18;

/// Prunes the key index: claims past the window, and claims whose publish ended
/// without storing. If more than half of `max` remain, the older half of the confirmed
/// ones goes too, so the index stays under `max` however many keys other processes ack
/// (their keys are only forgotten here after the window): a duplicate of a forgotten
/// key is stored twice, and the receiving `Idempotency` layer applies it once.
fn prune(keys: &mut HashMap<String, Claim>, now: Instant, window: Duration, max: usize) {
    // (A claim not stored is still publishing: its enqueue takes it out if it fails.)
    keys.retain(|_, c| !c.stored || now.duration_since(c.at) < window);
    if keys.len() <= max / 2 {
        return;
    }
    let mut ages: Vec<Instant> = keys.values().filter(|c| c.stored).map(|c| c.at).collect();
    if ages.is_empty() {
        return;
    }
    let mid = ages.len() / 2;
    let (_, &mut median, _) = ages.select_nth_unstable(mid);
    keys.retain(|_, c| !c.stored || c.at >= median);
}

/// What a second enqueue of a key finds in the index.
enum Found<'a> {
    /// Free: claimed now for this enqueue.
    Claimed(ClaimGuard<'a>),
    /// Stored within the window: a duplicate of this id.
    Duplicate(MessageId),
    /// Still being published by another enqueue: wait for its outcome.
    Publishing,
}

struct Link {
    conn: Arc<Connection>,
    ch: Channel,
    epoch: u64,
}

/// One of the queue's two connections (see [`Inner::consumer`] and
/// [`Inner::publisher`]), connected on first use and again after a failure.
struct Slot {
    link: Mutex<Option<Link>>,
    /// After a failed connect, when the next may be tried (read and set under `link`).
    cooldown: std::sync::Mutex<Cooldown>,
    /// A copy of the live `link`'s channel, read without waiting in line: every enqueue
    /// asks for the channel, and 64 of them queueing on the async lock cost more than
    /// the publish itself. Set and cleared (under `link`) with `link`.
    fast: std::sync::Mutex<Option<(Channel, Arc<Connection>, u64)>>,
}

impl Slot {
    fn new() -> Self {
        Self {
            link: Mutex::new(None),
            cooldown: std::sync::Mutex::new(Cooldown::new()),
            fast: std::sync::Mutex::new(None),
        }
    }

    fn lock_cooldown(&self) -> std::sync::MutexGuard<'_, Cooldown> {
        // Only plain assignments run under this lock.
        self.cooldown.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_fast(&self) -> std::sync::MutexGuard<'_, Option<(Channel, Arc<Connection>, u64)>> {
        // Only a clone or an assignment runs under this lock.
        self.fast.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the live link is the one of `epoch`.
    fn is_live(&self, epoch: u64) -> bool {
        self.lock_fast().as_ref().is_some_and(|l| l.2 == epoch)
    }
}

/// Spaces out connects to a broker that is down: after a failed connect, callers fail
/// at once (with that failure) until `until`, and the wait doubles with each failure.
/// Without it, every call waiting for the link tried its own connect in turn — 64
/// callers behind a broker that drops packets waited 64 connect timeouts, and a broker
/// coming back met all of them at once.
struct Cooldown {
    until: Option<Instant>,
    wait: Duration,
    last_error: String,
    /// The failure was a backend error (the queues' declaration refused), not the
    /// broker out of reach: refused calls say so too.
    backend: bool,
}

impl Cooldown {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    fn new() -> Self {
        Self {
            until: None,
            wait: Self::FIRST,
            last_error: String::new(),
            backend: false,
        }
    }

    /// The error for a call made during the cooldown, if it is on.
    fn refuse(&self, now: Instant) -> Option<QueueError> {
        let until = self.until.filter(|&u| now < u)?;
        let message = format!(
            "amqp: not connected ({}); next connect in {:?}",
            self.last_error,
            until - now
        );
        Some(if self.backend {
            QueueError::Backend(message.into())
        } else {
            QueueError::Unavailable(message.into())
        })
    }

    fn failed(&mut self, now: Instant, error: &QueueError) {
        self.until = Some(now + self.wait);
        self.wait = (self.wait * 2).min(Self::MAX);
        self.last_error = error.to_string();
        self.backend = matches!(error, QueueError::Backend(_));
    }

    fn connected(&mut self) {
        *self = Self::new();
    }
}

#[derive(Default)]
struct State {
    /// The connection generation the held deliveries belong to.
    epoch: u64,
    held: BTreeMap<MessageId, Held>,
    /// The `now` of the last `lease`, and when it was passed: retries are delayed
    /// relative to it, moved on by the time since (see [`State::now`]).
    last_now: Option<(SystemTime, Instant)>,
    /// Leases made so far: every lease's generation, unique even when a released
    /// delivery's attempts repeat.
    leases: u64,
    /// What this process knows of the deliveries it held when their channel died,
    /// kept until the message's copy leaves the queue (see [`Died`]).
    died: HashMap<MessageId, Died>,
    /// Deliveries [`make_room`](Inner::make_room) moved to the main queue's tail and not
    /// fetched back yet, with when: the queue's ready messages include them, and moving
    /// more only to fetch these back would send them round for ever.
    moved: HashMap<MessageId, Instant>,
    /// Spaces out making room while it brings nothing due.
    pacer: RoomPacer,
    /// Undecodable deliveries whose move to the dead-letter queue could not be
    /// published (an alarm blocks the publishing connection), held unacked on the
    /// channel of `epoch` for a later lease to move, with why and since when: given
    /// back, a quorum queue hands such a message out first again, and every lease
    /// stopped at it.
    aside: Vec<(lapin::message::Delivery, String, Instant)>,
}

impl State {
    /// The `now` of the last `lease`, moved on by the time since it was passed (the
    /// replayer may not lease for a while, all its slots busy or paused): a retry's
    /// delay measured from it unmoved would be overstated by that time.
    fn now(&self) -> SystemTime {
        self.last_now.map_or_else(SystemTime::now, |(now, at)| {
            super::saturating_add(now, at.elapsed())
        })
    }
}

/// Deliveries of one message held here when their channel died, for counting its
/// next delivery's attempts.
#[derive(Debug, Default, Clone, Copy)]
struct Died {
    /// Those held without a lease in progress (not yet due, or released): the broker
    /// counts them in `x-delivery-count` when it delivers the message again, but they
    /// were no attempt. Taken off then.
    uncounted: u32,
    /// The attempts counted here: the broker's count does not know of a delivery
    /// leased here more than once (its leases ended, and it was leased again without
    /// going back), so the message's next delivery starts from no fewer.
    counted: u32,
}

/// At most this many ids are remembered in [`State::died`] (more only if the
/// connection keeps dying with that many deliveries held): beyond it, the memory is
/// dropped and a redelivery counts as an attempt, as it would after a crash.
const UNCOUNTED_MAX: usize = 65_536;

struct Held {
    acker: lapin::acker::Acker,
    envelope: Envelope,
    state: HeldState,
    /// When the broker delivered it (real time): RabbitMQ closes a channel holding a
    /// delivery past its `consumer_timeout`.
    received: Instant,
}

impl Held {
    /// Whether a lease at `now` may take it (see [`leasable`]; a second copy is merged
    /// in by `lease`).
    fn due(&self, now: SystemTime) -> bool {
        leasable(self.state, self.envelope.not_before, now)
    }

    /// What it waits for at `now` (see [`waiting`]).
    fn waiting(&self, now: SystemTime) -> HeldState {
        waiting(self.state, self.envelope.not_before, now)
    }

    /// Takes in another copy of the same message, its `not_before` and `attempts`,
    /// before that copy's delivery is acked away: which is a retry's copy cannot be
    /// told, so the message keeps the later not-before and the higher attempts of the
    /// two (a lease in progress goes on; once it ends, the message waits for that
    /// not-before).
    fn absorb_copy(&mut self, not_before: SystemTime, attempts: u32) {
        if not_before > self.envelope.not_before {
            self.envelope.not_before = not_before;
            if let HeldState::Scheduled(_) = self.state {
                self.state = HeldState::Scheduled(not_before);
            }
        }
        self.envelope.attempts = self.envelope.attempts.max(attempts);
    }
}

// === impl AmqpOptions ===

impl AmqpOptions {
    /// Options for the queue `name` (it names the RabbitMQ queues), at the URL from
    /// `POSTBOX_AMQP_URL` or else `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            url: None,
            capacity: None,
            hold_limit: Duration::from_secs(300),
            dedupe_window: Duration::from_secs(24 * 3600),
            max_held: 10_000,
            timeout: Duration::from_secs(5),
            max_message_size: 16 << 20,
        }
    }

    /// Connects to `url` (`amqp://user:password@host:port/vhost`) instead.
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Holds at most `capacity` ready messages in the main queue; beyond that `enqueue`
    /// fails with [`QueueError::Full`]. Each enqueue checks the count first (one more
    /// round trip), and the queue has `x-max-length` with `x-overflow: reject-publish`
    /// as a backstop, so concurrent enqueues can overshoot by a few. RabbitMQ counts
    /// ready messages only, not unacked ones.
    ///
    /// Those two arguments are part of the main queue's declaration, fixed when it is
    /// first declared: every process on the queue must give the same capacity, or none
    /// all of them (RabbitMQ refuses a declaration with other arguments,
    /// `PRECONDITION_FAILED`: [`connect`](AmqpQueue::connect) fails with
    /// [`QueueError::Backend`]). To change it, delete the queue once it is drained, or
    /// set the limit with a RabbitMQ policy (`max-length`) instead.
    pub fn with_capacity(mut self, capacity: u64) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// How far away a not-before may be for the message to be held unacked until it is
    /// due (default 5 min); further ones go through the delay queue. Keep it below the
    /// broker's `consumer_timeout`.
    pub fn with_hold_limit(mut self, limit: Duration) -> Self {
        self.hold_limit = limit;
        self
    }

    /// How long the in-process de-duplication index remembers a key whose message it
    /// did not see acked (default 24 h).
    pub fn with_dedupe_window(mut self, window: Duration) -> Self {
        self.dedupe_window = window;
        self
    }

    /// How many deliveries this process holds unacked at most (default 10 000); see
    /// the module docs, "Leases", for what a lease does when that many are held. Each
    /// is kept in memory with its body while held: at most `max` × the largest body
    /// (10 000 × 100 KiB is a GiB). Lower it for large bodies.
    pub fn with_max_held(mut self, max: usize) -> Self {
        self.max_held = max.max(1);
        self
    }

    /// How long to wait for the broker (connect, confirms) before a call fails with
    /// [`QueueError::Unavailable`] (default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The largest encoded message `enqueue` sends (default 16 MiB, RabbitMQ 4's
    /// `max_message_size`; RabbitMQ 3 allows 128 MiB): a larger one is refused with
    /// [`QueueError::Backend`]. Sent, the broker would close the publishing channel,
    /// which every enqueue of this process shares. Set it to the broker's own
    /// `max_message_size` if that is lower.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// The URL that will be used.
    pub fn url(&self) -> String {
        super::broker_url(self.url.as_deref(), AMQP_URL_ENV, DEFAULT_AMQP_URL)
    }
}

// === impl AmqpQueue ===

impl AmqpQueue {
    /// Connects and declares the three queues.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] if the broker cannot be reached,
    /// [`QueueError::Backend`] for an invalid URL, or if it refuses the declarations
    /// (for example an existing queue of that name with other arguments).
    pub async fn connect(options: AmqpOptions) -> Result<Self, QueueError> {
        // Parsed first: a bad URL is no outage (each reconnect would try it again).
        if let Err(e) = options.url().parse::<lapin::uri::AMQPUri>() {
            return Err(QueueError::Backend(
                format!("amqp queue {}: invalid URL: {e}", options.name).into(),
            ));
        }
        let queue = format!("postbox.{}", options.name);
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            url: options.url(),
            delay_queue: format!("{queue}.delay"),
            dead_queue: format!("{queue}.dead"),
            queue,
            capacity: options.capacity,
            hold_limit: options.hold_limit,
            dedupe_window: options.dedupe_window,
            max_held: options.max_held,
            timeout: options.timeout,
            max_message_size: options.max_message_size,
            consumer: Slot::new(),
            publisher: Slot::new(),
            last_epoch: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(State::default()),
            keys: std::sync::Mutex::new(HashMap::new()),
            publish_ended: Notify::new(),
            reaping: std::sync::Mutex::new(Vec::new()),
        });
        let (_, epoch) = inner.channel().await?;
        if let Err(e) = inner.publisher().await {
            // Closed: a connection only dropped stays open (see `close_in_background`).
            inner.unlink(epoch, "connect failed").await;
            return Err(e);
        }
        Ok(Self { inner })
    }

    /// The names of the main, delay and dead-letter queues.
    pub fn queues(&self) -> [&str; 3] {
        [
            &self.inner.queue,
            &self.inner.delay_queue,
            &self.inner.dead_queue,
        ]
    }

    /// The queue's publishing channel on its current connection (connecting if
    /// needed), for requests of your own: declarations, deletes, passive reads of a
    /// queue's depth. It is the channel postbox publishes on (publisher confirms on),
    /// and postbox takes the returns that come on it: for publishes of your own, with
    /// `mandatory` or `wait_for_confirms`, open a channel on a connection of your own.
    /// (Leases and acks go over a second connection, which never publishes: see
    /// [`AmqpQueue`].)
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] if the broker cannot be reached, or while it blocks
    /// publishing (a memory or disk alarm: requests on the channel would wait for its
    /// end).
    pub async fn channel(&self) -> Result<Channel, QueueError> {
        Ok(self.inner.publisher().await?.0)
    }

    /// Deletes the three queues (all messages and dead letters) and forgets this
    /// process' leases and keys.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] or [`QueueError::Backend`].
    pub async fn purge(&self) -> Result<(), QueueError> {
        let (ch, epoch) = self.inner.channel().await?;
        {
            let mut st = self.inner.state.lock().await;
            st.held.clear();
            st.aside.clear();
        }
        self.inner.lock_keys().clear();
        // Enqueues waiting for a claim just forgotten would not hear its publish end.
        self.inner.publish_ended.notify_waiters();
        for q in self.queues() {
            self.inner
                .io(epoch, ch.queue_delete(q, QueueDeleteOptions::default()))
                .await?;
        }
        Ok(())
    }
}

/// Closes a replaced connection without waiting for it. lapin's `Connection` has no
/// `Drop`: a connection only dropped (or whose `close` future is only dropped) keeps its
/// socket and heartbeats open for the life of the process.
fn close_in_background(conn: Arc<Connection>, why: &'static str) {
    if !conn.status().connected() {
        return;
    }
    tokio::spawn(async move {
        let closing = tokio::time::timeout(Duration::from_secs(5), conn.close(200, why)).await;
        if !matches!(closing, Ok(Ok(()))) {
            tracing::debug!(
                reason = why,
                "postbox: an old amqp connection did not close cleanly"
            );
        }
    });
}

impl Inner {
    fn lock_keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, Claim>> {
        // Only plain map operations run under this lock; a panic there leaves it usable.
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The consumer's current channel and its generation, connecting first if needed.
    async fn channel(&self) -> Result<(Channel, u64), QueueError> {
        self.connect(&self.consumer).await
    }

    /// The publisher's current channel and its generation, connecting first if needed;
    /// [`blocked`](Self::blocked) while the broker blocks it.
    async fn publisher(&self) -> Result<(Channel, u64), QueueError> {
        if let Some(e) = self.blocked() {
            return Err(e);
        }
        self.connect(&self.publisher).await
    }

    /// `slot`'s current channel and its generation, connecting first if needed.
    async fn connect(&self, slot: &Slot) -> Result<(Channel, u64), QueueError> {
        if let Some((ch, conn, epoch)) = slot.lock_fast().as_ref()
            && conn.status().connected()
            && ch.status().connected()
        {
            return Ok((ch.clone(), *epoch));
        }
        let mut link = slot.link.lock().await;
        if let Some(l) = link.as_ref()
            && l.conn.status().connected()
            && l.ch.status().connected()
        {
            return Ok((l.ch.clone(), l.epoch));
        }
        if let Some(e) = slot.lock_cooldown().refuse(Instant::now()) {
            return Err(e);
        }
        let epoch = self
            .last_epoch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        *slot.lock_fast() = None;
        if let Some(old) = link.take() {
            close_in_background(old.conn, "reconnecting");
        }
        let connect = async {
            let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            self.declare(&ch).await?;
            Ok::<_, lapin::Error>((conn, ch))
        };
        let connected = match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(pair)) => Ok(pair),
            // The URL without its credentials: the error is logged.
            Ok(Err(e)) => Err(classify(
                e,
                &format!(
                    "connect to {:?}",
                    crate::queue::envelope::RedactedUri(&self.url)
                ),
            )),
            Err(_) => Err(QueueError::Unavailable(
                format!(
                    "amqp connect to {:?}: timed out",
                    crate::queue::envelope::RedactedUri(&self.url)
                )
                .into(),
            )),
        };
        let (conn, ch) = match connected {
            Ok(pair) => {
                slot.lock_cooldown().connected();
                pair
            }
            Err(e) => {
                slot.lock_cooldown().failed(Instant::now(), &e);
                return Err(e);
            }
        };
        let conn = Arc::new(conn);
        *slot.lock_fast() = Some((ch.clone(), conn.clone(), epoch));
        *link = Some(Link {
            conn,
            ch: ch.clone(),
            epoch,
        });
        Ok((ch, epoch))
    }

    /// Maps a failed call; the link is dropped so the next call reconnects.
    async fn fail(&self, e: lapin::Error, epoch: u64) -> QueueError {
        self.unlink(epoch, "error").await;
        classify(e, "call")
    }

    /// Drops the link of `epoch` (of either slot), if it is still live, and closes its
    /// connection (closed, not just dropped: see `close_in_background`).
    async fn unlink(&self, epoch: u64, why: &'static str) {
        for slot in [&self.consumer, &self.publisher] {
            // Not this slot's (its link is of another epoch), without waiting for its
            // lock (held through a connect).
            if !slot.is_live(epoch) {
                continue;
            }
            let mut link = slot.link.lock().await;
            if link.as_ref().is_some_and(|l| l.epoch == epoch)
                && let Some(old) = link.take()
            {
                *slot.lock_fast() = None;
                close_in_background(old.conn, why);
                return;
            }
        }
    }

    /// Declares the three queues (idempotent): on every connection, and again after a
    /// publish came back because one was deleted.
    async fn declare(&self, ch: &Channel) -> Result<(), lapin::Error> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let mut main = FieldTable::default();
        main.insert("x-queue-type".into(), string("quorum"));
        if let Some(cap) = self.capacity {
            main.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(i64::try_from(cap).unwrap_or(i64::MAX)),
            );
            main.insert("x-overflow".into(), string("reject-publish"));
        }
        ch.queue_declare(&self.queue, durable, main).await?;
        let mut delay = FieldTable::default();
        delay.insert("x-queue-type".into(), string("quorum"));
        delay.insert("x-dead-letter-exchange".into(), string(""));
        delay.insert("x-dead-letter-routing-key".into(), string(&self.queue));
        delay.insert("x-dead-letter-strategy".into(), string("at-least-once"));
        delay.insert("x-overflow".into(), string("reject-publish"));
        ch.queue_declare(&self.delay_queue, durable, delay).await?;
        // Classic, not quorum: `dead_letters` gets and puts back, which a quorum queue
        // would count towards its delivery limit (4.x drops a message past it).
        ch.queue_declare(&self.dead_queue, durable, FieldTable::default())
            .await?;
        Ok(())
    }

    /// Publishes with a confirm, `mandatory`: a message no queue takes (the queue was
    /// deleted) comes back instead of being confirmed and dropped.
    async fn publish(
        &self,
        ch: &Channel,
        epoch: u64,
        routing_key: &str,
        envelope: &Envelope,
        extra: &[(&str, AMQPValue)],
        expiration: Option<Duration>,
    ) -> Result<Answer, QueueError> {
        envelope.check_encodable()?;
        let mut headers = FieldTable::default();
        // The headers travel in one frame (`frame_max`, 128 KiB on a stock server), and
        // the broker closes the connection on a larger one: a long key or destination
        // is left to the envelope.
        if envelope.idempotency_key.len() <= MAX_HEADER_TEXT {
            headers.insert(H_KEY.into(), string(&envelope.idempotency_key));
        }
        if envelope.destination.len() <= MAX_HEADER_TEXT {
            headers.insert(H_DEST.into(), string(&envelope.destination));
        }
        headers.insert(
            H_NOT_BEFORE.into(),
            AMQPValue::LongLongInt(ms_ceil(envelope.not_before)),
        );
        headers.insert(
            H_CREATED.into(),
            AMQPValue::LongLongInt(ms_floor(envelope.created_at)),
        );
        headers.insert(
            H_ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(envelope.attempts)),
        );
        for (k, v) in extra {
            headers.insert((*k).into(), v.clone());
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(CONTENT_TYPE.into())
            .with_message_id(envelope.id.to_string().into())
            .with_headers(headers);
        if let Some(ttl) = expiration {
            // The broker refuses (and closes the channel on) a TTL over 2^32 - 1 ms,
            // about 49.7 days: a further not-before waits that long, comes back and is
            // parked again for the rest.
            let ms = ttl.as_millis().clamp(1, u128::from(MAX_TTL_MS));
            props = props.with_expiration(ms.to_string().into());
        }
        let payload = envelope.encode();
        let c = self
            .publish_confirmed(ch, epoch, routing_key, &payload, props)
            .await?;
        let answer = self.answer(&c, &envelope.id, routing_key);
        self.declare_if_returned(ch, epoch, answer, routing_key)
            .await;
        Ok(answer)
    }

    /// Publishes a copy of a held delivery (a retry's, a move's, a dead letter's) on
    /// the publisher's channel. A failure leaves the delivery to its caller, on its
    /// channel, which lives on: see [`Parked::NotCopied`].
    async fn publish_copy(
        &self,
        routing_key: &str,
        envelope: &Envelope,
        extra: &[(&str, AMQPValue)],
        expiration: Option<Duration>,
    ) -> Result<Answer, QueueError> {
        let (ch, at) = self.publisher().await?;
        self.publish(&ch, at, routing_key, envelope, extra, expiration)
            .await
    }

    /// The error for a publish while the broker blocks the publishing connection (a
    /// memory or disk alarm), if it does: answered at once, rather than after the
    /// timeout (the connection is kept: made again, it would be blocked again at its
    /// first publish).
    fn blocked(&self) -> Option<QueueError> {
        // Connected too: lapin leaves a connection that failed while blocked marked
        // blocked, and that one is to be made again.
        let blocked = self
            .publisher
            .lock_fast()
            .as_ref()
            .is_some_and(|(_, conn, _)| conn.status().connected() && conn.status().blocked());
        blocked.then(|| {
            QueueError::Unavailable(
                "amqp: the broker blocks publishing (a memory or disk alarm)".into(),
            )
        })
    }

    /// A publish came back (`answer`): its queue was deleted by hand, and is declared
    /// again, for the caller's next try.
    async fn declare_if_returned(
        &self,
        ch: &Channel,
        epoch: u64,
        answer: Answer,
        routing_key: &str,
    ) {
        if answer == Answer::Returned {
            tracing::error!(
                queue = routing_key,
                "postbox: a publish came back: the queue does not exist; declaring it again"
            );
            if let Err(e) = self.io(epoch, self.declare(ch)).await {
                tracing::warn!(queue = routing_key, error = %e, "postbox: could not declare the queues again");
            }
        }
    }

    /// Publishes `payload` to `routing_key` (`mandatory`) and waits for its confirm, at
    /// most the timeout (then the link is dropped, as by [`io`](Self::io)). A confirm
    /// given up on (the timeout passed, or the caller stopped waiting) is awaited on a
    /// task of its own ([`Pending`]): a return it carries, another call's message, is
    /// published again.
    async fn publish_confirmed(
        &self,
        ch: &Channel,
        epoch: u64,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<Confirmation, QueueError> {
        let mut pending = Pending {
            inner: self,
            ch,
            epoch,
            started: false,
            confirm: None,
        };
        let publish = pending.publish(routing_key, payload, props);
        match tokio::time::timeout(self.timeout, publish).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(self.fail(e, epoch).await),
            Err(_) => Err(self
                .timed_out(epoch, "amqp publisher confirm timed out")
                .await),
        }
    }

    /// The answer to the publish of message `id` to `routing_key`; a return of another
    /// publish that came with its confirm is published again.
    fn answer(
        &self,
        c: &Confirmation,
        id: &(dyn fmt::Display + Sync),
        routing_key: &str,
    ) -> Answer {
        let (answer, foreign) = Answer::of(c, id, routing_key);
        if let Some(returned) = foreign {
            self.publish_again_beside(vec![orphan(returned)]);
        }
        answer
    }

    /// Publishes `orphans` again ([`publish_returned_again`](Self::publish_returned_again))
    /// on a task of their own, so a caller that stops waiting (a cancelled enqueue) does
    /// not take them with it.
    #[cold]
    fn publish_again_beside(&self, orphans: Vec<Orphan>) {
        if let Some((inner, rt)) = self.beside("returned messages of other calls") {
            rt.spawn(async move { inner.publish_returned_again(orphans).await });
        }
    }

    /// This `Inner` and the runtime, for a task beside the caller's (see
    /// [`publish_returned_again`](Self::publish_returned_again)); `None`, logged as
    /// `what` possibly lost, without a runtime (or once the queue is dropped).
    #[cold]
    fn beside(&self, what: &str) -> Option<(Arc<Inner>, tokio::runtime::Handle)> {
        match (self.me.upgrade(), tokio::runtime::Handle::try_current()) {
            (Some(inner), Ok(rt)) => Some((inner, rt)),
            _ => {
                tracing::error!(
                    "postbox: {what} cannot be published again (no runtime); they may be lost"
                );
                None
            }
        }
    }

    /// Has [`reap`](Self::reap) drain `ch`'s kept returns for the next timeout's time
    /// (started if it does not run): a publish was cancelled while lapin sent it, and
    /// lapin keeps its confirm, with a return it may carry, for `wait_for_confirms`.
    #[cold]
    fn reap_soon(&self, ch: &Channel, epoch: u64) {
        let Some((inner, rt)) = self.beside("returns kept for a cancelled publish") else {
            return;
        };
        let until = crate::clock::later(Instant::now(), self.timeout);
        let mut reaping = self.reaping.lock().unwrap_or_else(|e| e.into_inner());
        let running = !reaping.is_empty();
        match reaping
            .iter_mut()
            .find(|(c, e, _)| *e == epoch && c.id() == ch.id())
        {
            Some(entry) => entry.2 = until,
            None => reaping.push((ch.clone(), epoch, until)),
        }
        drop(reaping);
        if !running {
            rt.spawn(async move { inner.reap().await });
        }
    }

    /// Every 50 ms, takes the returns lapin keeps for confirms nobody awaits any more on
    /// each channel [`reap_soon`](Self::reap_soon) named (until the time it set), and
    /// publishes them again. lapin's `wait_for_confirms` first waits for the channel's
    /// last confirm, which on a busy channel may never come (a later publish took its
    /// place): waited on for at most 50 ms, then called again, it drains at once.
    async fn reap(&self) {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            // The channels to drain, and whether this is the last round (none is named
            // any more: a `reap_soon` from then on starts a new task).
            let (channels, last) = {
                let mut reaping = self.reaping.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let channels: Vec<Channel> = reaping.iter().map(|(c, _, _)| c.clone()).collect();
                reaping.retain(|(_, _, until)| now < *until);
                (channels, reaping.is_empty())
            };
            for ch in &channels {
                self.drain_kept(ch).await;
            }
            if last {
                return;
            }
        }
    }

    /// Takes the returns lapin keeps on `ch` (see [`reap`](Self::reap)) and publishes
    /// them again.
    async fn drain_kept(&self, ch: &Channel) {
        for wait in [Duration::from_millis(50), Duration::ZERO, Duration::ZERO] {
            // (An error is a closed channel, whose last confirm failed: the next call
            // drains. A timeout: the next call finds no last confirm to wait for.)
            if let Ok(Ok(returned)) = tokio::time::timeout(wait, ch.wait_for_confirms()).await {
                if !returned.is_empty() {
                    self.publish_again_beside(returned.iter().map(orphan).collect());
                }
                return;
            }
        }
    }

    /// Publishes again messages returned as unroutable whose return lapin handed to the
    /// confirm of another publish: lapin pairs each confirm with the oldest return
    /// waiting, not by delivery tag, so the publish a return belongs to may have been
    /// answered `Confirmed` (a dead letter then acked its delivery). Published again here
    /// (on a task of its own: [`publish_again_beside`](Self::publish_again_beside),
    /// [`Pending`], [`reap`](Self::reap)), on the current channel after the queues are
    /// declared again, it is not lost. It may be stored more than once: a publish again
    /// whose confirm timed out is tried again though the broker may have stored it, and
    /// a cancelled publish's own return is published too (at least once, as a retried
    /// `Unavailable` enqueue). Each publish again is answered as any other: a return of
    /// yet another publish that comes with its confirm is published again too. One that
    /// fails or comes back (the queue deleted again in between) is tried again after a
    /// pause (200 ms, doubling up to 5 s), up to [`MAX_PUBLISH_AGAIN`] times. Only
    /// postbox's own three queues are published to: a return of a publish of the
    /// caller's own on [`AmqpQueue::channel`] (which it should not make there) is
    /// dropped.
    #[cold]
    async fn publish_returned_again(&self, mut orphans: Vec<Orphan>) {
        while let Some((routing_key, data, properties, tries)) = orphans.pop() {
            let key = routing_key.as_str();
            let ours = [&self.queue, &self.delay_queue, &self.dead_queue];
            if !ours.iter().any(|q| q.as_str() == key) {
                tracing::warn!(
                    queue = key,
                    "postbox: a publish of another queue's came back (on a channel of this queue's): dropped"
                );
                continue;
            }
            if tries == MAX_PUBLISH_AGAIN {
                tracing::error!(
                    queue = key,
                    tries,
                    "postbox: a returned message could not be published again; it may be lost"
                );
                continue;
            }
            if tries > 0 {
                let pause = Duration::from_millis(100 << tries.min(6)).min(Duration::from_secs(5));
                tokio::time::sleep(pause).await;
            }
            tracing::error!(
                queue = key,
                "postbox: another call's publish came back: declaring the queues again and publishing it again"
            );
            let published = async {
                let (ch, epoch) = self.publisher().await?;
                if let Err(e) = self.io(epoch, self.declare(&ch)).await {
                    tracing::warn!(error = %e, "postbox: could not declare the queues again");
                }
                self.publish_confirmed(&ch, epoch, key, &data, properties.clone())
                    .await
            };
            match published.await {
                Ok(c) => {
                    let id = properties.message_id().as_ref().map_or("", |m| m.as_str());
                    let (answer, foreign) = Answer::of(&c, &id, key);
                    if let Some(foreign) = foreign {
                        orphans.push(orphan(foreign));
                    }
                    match answer {
                        Answer::Confirmed => {}
                        Answer::Returned => {
                            orphans.push((routing_key, data, properties, tries + 1));
                        }
                        Answer::Nacked => tracing::error!(
                            queue = key,
                            "postbox: a returned message published again was refused (nack); it may be lost"
                        ),
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = key, error = %e, "postbox: a returned message could not be published again yet");
                    orphans.push((routing_key, data, properties, tries + 1));
                }
            }
        }
    }

    /// Awaits a broker call for at most the timeout; a failure or a timeout drops the
    /// link so the next call reconnects.
    async fn io<T>(
        &self,
        epoch: u64,
        call: impl Future<Output = lapin::Result<T>>,
    ) -> Result<T, QueueError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.fail(e, epoch).await),
            Err(_) => Err(self
                .timed_out(epoch, "amqp: broker did not answer in time")
                .await),
        }
    }

    async fn drop_link(&self, epoch: u64) {
        self.unlink(epoch, "timeout").await;
    }

    /// The error for a call on the link of `epoch` that timed out (`what`), the link
    /// dropped, unless it is the publishing link the broker blocks (a publish, or a
    /// call behind one such as an enqueue's capacity check): that one is kept, and the
    /// publish goes out once the alarm ends (stored, though answered `Unavailable`
    /// here), rather than a new connection blocked again at its first publish.
    async fn timed_out(&self, epoch: u64, what: &'static str) -> QueueError {
        if let Some(e) = self.blocked().filter(|_| self.publisher.is_live(epoch)) {
            return e;
        }
        self.drop_link(epoch).await;
        QueueError::Unavailable(what.into())
    }

    async fn enqueue(&self, envelope: Envelope) -> Result<Enqueued, QueueError> {
        // Only here, before the key is claimed: a retry or a dead letter republishes
        // what the broker took already (refused, it could be neither).
        let len = envelope.encoded_len();
        if len > self.max_message_size {
            return Err(QueueError::Backend(
                format!(
                    "an encoded message of {len} bytes: the queue sends at most {} \
                     (AmqpOptions::with_max_message_size)",
                    self.max_message_size
                )
                .into(),
            ));
        }
        let key = envelope.idempotency_key.clone();
        // Held until the outcome is known: dropped unconfirmed (failure, cancellation)
        // it lets an enqueue of the same key that is waiting for it go ahead.
        let mut claim = None;
        while !key.is_empty() && claim.is_none() {
            // Made before the index is read: a publish that ends in between still
            // wakes it.
            let ended = self.publish_ended.notified();
            match self.claim(&key, envelope.id) {
                Found::Claimed(guard) => claim = Some(guard),
                Found::Duplicate(id) => return Ok(Enqueued::Duplicate(id)),
                // Either way the index has changed by the time this returns.
                Found::Publishing => ended.await,
            }
        }
        let result = async {
            let (ch, epoch) = self.publisher().await?;
            if let Some(capacity) = self.capacity {
                // RabbitMQ applies a quorum queue's `x-max-length` a little late, so
                // check first; the queue's own limit is the backstop under concurrency.
                if self.ready(&ch, epoch, &self.queue).await? >= capacity {
                    return Ok(Answer::Nacked);
                }
            }
            self.publish(&ch, epoch, &self.queue, &envelope, &[], None)
                .await
        }
        .await;
        match result {
            Ok(Answer::Confirmed) => {
                if let Some(guard) = claim {
                    guard.confirm();
                }
                Ok(Enqueued::Stored(envelope.id))
            }
            other => {
                // Out of the index, a waiting enqueue of the key woken.
                drop(claim);
                match other {
                    Ok(Answer::Nacked) if self.capacity.is_some() => Err(QueueError::Full {
                        capacity: self.capacity.unwrap_or(0),
                    }),
                    Ok(answer) => {
                        Err(answer.error(format!("{}: {}", self.queue, answer.refusal())))
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Looks `key` up in the de-duplication index for the enqueue of `id`, claiming it
    /// if it is free: never claimed, forgotten, older than the window, or claimed by an
    /// enqueue that ended without storing its message.
    fn claim(&self, key: &str, id: MessageId) -> Found<'_> {
        let mut keys = self.lock_keys();
        let now = Instant::now();
        if let Some(c) = keys.get_mut(key) {
            if !c.stored {
                // Its enqueue is still publishing (it takes the claim out if it fails).
                c.waited = true;
                return Found::Publishing;
            }
            if now.duration_since(c.at) < self.dedupe_window {
                return Found::Duplicate(c.id);
            }
        }
        keys.insert(
            key.to_owned(),
            Claim {
                id,
                at: now,
                stored: false,
                waited: false,
            },
        );
        if keys.len() > 4096 && keys.len().is_power_of_two() {
            prune(&mut keys, now, self.dedupe_window, MAX_KEYS);
        }
        Found::Claimed(ClaimGuard {
            inner: self,
            key: key.to_owned(),
            id,
            confirmed: false,
        })
    }

    fn forget_key(&self, key: &str, id: MessageId) {
        if key.is_empty() {
            return;
        }
        let mut keys = self.lock_keys();
        let waited = match keys.get(key) {
            Some(c) if c.id == id => keys.remove(key).is_some_and(|c| c.waited),
            _ => false,
        };
        drop(keys);
        if waited {
            self.publish_ended.notify_waiters();
        }
    }

    async fn lease(
        &self,
        max: usize,
        lease_for: Duration,
        now: SystemTime,
    ) -> Result<Vec<Leased>, QueueError> {
        let (ch, epoch) = self.channel().await?;
        let mut st = self.state.lock().await;
        Self::follow(&mut st, epoch)?;
        st.last_now = Some((now, Instant::now()));
        if max == 0 {
            return Ok(Vec::new());
        }
        self.move_aside(epoch, &mut st).await?;
        let due = st.held.values().filter(|h| h.due(now)).count();
        let mut moved = 0;
        if st.held.len() < self.max_held {
            // Not full: a later outage's first move starts from the shortest pause.
            st.pacer.calm();
        } else if due < max && st.pacer.may() {
            moved = self.make_room(&ch, epoch, &mut st, max - due, now).await;
        }
        let mut fetched = 0;
        // Once a move of an undecodable message failed, the others are set aside without
        // trying (each try may wait the timeout, the hold locked).
        let mut moves_fail = self.blocked().is_some();
        while fetched < max && st.held.len() + st.aside.len() < self.max_held {
            let got = self
                .io(
                    epoch,
                    ch.basic_get(&self.queue, BasicGetOptions { no_ack: false }),
                )
                .await?;
            let Some(msg) = got else { break };
            fetched += 1;
            let delivery = msg.delivery;
            let mut envelope = match Envelope::decode(&delivery.data) {
                Ok(e) => e,
                Err(e) => {
                    let why = e.to_string();
                    let kept = if moves_fail {
                        Some(delivery)
                    } else {
                        self.move_undecodable(epoch, delivery, &why).await?
                    };
                    if let Some(kept) = kept {
                        moves_fail = true;
                        if st.aside.len() < super::hold::MOVE_AT_ONCE {
                            st.aside.push((kept, why, Instant::now()));
                            continue;
                        }
                        // Enough set aside: given back, and the fetch ends here (it
                        // would meet this message again first).
                        self.io(epoch, kept.acker.nack(requeue())).await?;
                        break;
                    }
                    continue;
                }
            };
            let headers = delivery.properties.headers().clone().unwrap_or_default();
            let int = |k: &str| headers.inner().get(k).and_then(as_i64);
            if let Some(a) = int(H_ATTEMPTS) {
                envelope.attempts = u32::try_from(a).unwrap_or(envelope.attempts);
            }
            // Earlier deliveries of this copy were held by a channel that died: each was
            // an attempt, unless this process knows it was not leased then.
            let redelivered = u32::try_from(int("x-delivery-count").unwrap_or(0)).unwrap_or(0);
            // A running total, like the broker's count: kept until this copy leaves
            // the queue (acked, parked or dead-lettered), so a second reconnect does not
            // count the first one's uncounted delivery.
            let died = st.died.get(&envelope.id).copied().unwrap_or_default();
            envelope.attempts = envelope
                .attempts
                .saturating_add(redelivered.saturating_sub(died.uncounted))
                .max(died.counted);
            if let Some(nb) = int(H_NOT_BEFORE)
                && ms_ceil(envelope.not_before) != nb
            {
                envelope.not_before = super::saturating_add(
                    SystemTime::UNIX_EPOCH,
                    Duration::from_millis(nb.max(0).unsigned_abs()),
                );
            }
            let id = envelope.id;
            if !st.moved.is_empty() {
                st.moved.remove(&id);
            }
            if let Some(h) = st.held.get_mut(&id) {
                // A second copy of a message already held (left by a `retry_later` whose
                // republish was confirmed but whose ack of the old copy was lost): the
                // held one goes on, this one is dropped from the queue (the retry's
                // delay kept, should the original have come first).
                h.absorb_copy(envelope.not_before, envelope.attempts);
                tracing::warn!(queue = %self.queue, %id, "postbox: duplicate copy of a held message acked");
                self.io(epoch, delivery.acker.ack(BasicAckOptions::default()))
                    .await?;
                continue;
            }
            let state = HeldState::Scheduled(envelope.not_before);
            st.held.insert(
                id,
                Held {
                    acker: delivery.acker,
                    envelope,
                    state,
                    received: Instant::now(),
                },
            );
        }
        if moved > 0 {
            let due_now = st.held.values().filter(|h| h.due(now)).count();
            st.pacer.made(due_now > due);
        }
        // Messages due too far away wait in the delay queue, not unacked here; one held
        // unleased for longer than the hold limit (released again and again while the
        // replayer's breaker stays open) goes back to its queue, so no delivery is held
        // towards the broker's `consumer_timeout`, which would close the channel and
        // end every lease on it.
        let far: Vec<MessageId> = st
            .held
            .iter()
            .filter(|(_, h)| {
                // A lease that ended on a message a second copy moved later counts
                // as waiting for that not-before.
                matches!(h.waiting(now), HeldState::Scheduled(nb)
                if nb.duration_since(now).is_ok_and(|wait| {
                    wait > self.hold_limit
                        || (!wait.is_zero() && h.received.elapsed() > self.hold_limit)
                }))
            })
            .map(|(&id, _)| id)
            .collect();
        // A main queue that hands one back is full: the others bound for it stay held
        // for this lease (each would cost a round trip to be handed back too).
        let mut main_full = false;
        for id in far {
            let to_main = st.held.get(&id).is_some_and(|h| {
                matches!(h.waiting(now), HeldState::Scheduled(nb)
                    if nb.duration_since(now).is_ok_and(|wait| wait <= self.hold_limit))
            });
            if main_full && to_main {
                continue;
            }
            if let Some(h) = st.held.remove(&id) {
                match self.park(&ch, epoch, h, now).await? {
                    Parked::Held(h) => {
                        main_full = true;
                        st.held.insert(id, h);
                    }
                    Parked::NotCopied(h, e) => {
                        tracing::debug!(queue = %self.queue, %id, error = %e, "postbox: a held delivery could not be parked; held on");
                        st.held.insert(id, h);
                        break;
                    }
                    Parked::Main | Parked::Delay => {
                        st.died.remove(&id);
                    }
                }
            }
        }
        let lease_until = super::saturating_add(now, lease_for);
        let mut out = Vec::new();
        let st = &mut *st;
        for (&id, h) in st.held.iter_mut() {
            if out.len() >= max {
                break;
            }
            if !h.due(now) {
                continue;
            }
            h.envelope.attempts = h.envelope.attempts.saturating_add(1);
            st.leases += 1;
            let generation = st.leases;
            h.state = HeldState::Leased(lease_until, generation);
            out.push(Leased {
                envelope: h.envelope.clone(),
                token: LeaseToken { id, generation },
                lease_until,
            });
        }
        // A due delivery no lease took (more are due than the replayer takes: a backlog
        // behind a slow dependency), held unleased past the hold limit, goes back to the
        // main queue's tail too: held on, it would reach the broker's `consumer_timeout`.
        // After the leases, so those handed out are the first due; bounded as
        // `make_room` is (the hold is locked meanwhile, and the leases' time runs), the
        // rest left to the next lease.
        let until = Instant::now().checked_add(self.timeout);
        let stale: Vec<MessageId> = st
            .held
            .iter()
            .filter(|(_, h)| {
                !matches!(h.state, HeldState::Leased(..))
                    && h.due(now)
                    && h.received.elapsed() > self.hold_limit
            })
            .map(|(&id, _)| id)
            .take(super::hold::MOVE_AT_ONCE)
            .collect();
        for id in stale {
            if until.is_some_and(|until| Instant::now() >= until) {
                break;
            }
            let Some(h) = st.held.remove(&id) else {
                continue;
            };
            match self.park(&ch, epoch, h, now).await {
                Ok(Parked::Held(h)) => {
                    // The main queue is full: the rest stay held until there is room.
                    st.held.insert(id, h);
                    break;
                }
                Ok(Parked::NotCopied(h, e)) => {
                    tracing::debug!(queue = %self.queue, %id, error = %e, "postbox: a stale delivery could not be parked; held on");
                    st.held.insert(id, h);
                    break;
                }
                Ok(Parked::Main | Parked::Delay) => {
                    st.died.remove(&id);
                }
                // Its channel still up (a refused copy, the delivery given back to the
                // queue): the leases made above stand, and are handed out; the rest
                // wait for the next lease. Failed with them, their attempts were
                // counted for deliveries never made.
                Err(e) if self.consumer.is_live(epoch) => {
                    tracing::debug!(queue = %self.queue, %id, error = %e, "postbox: a stale delivery could not be parked");
                    break;
                }
                // The channel is gone, and with it the leases made on it.
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Moves an undecodable delivery on the consumer's channel of `epoch` to the
    /// dead-letter queue as it is (payload and properties but its own
    /// `message_id`, with `postbox-reason: undecodable: {why}`), then acks it; counted
    /// and logged once moved. `Ok(Some(delivery))`: not moved, the publish failed (a
    /// broken or blocked publishing connection), the delivery still unacked. A move
    /// the broker refused gives the delivery back and fails the call.
    async fn move_undecodable(
        &self,
        epoch: u64,
        delivery: lapin::message::Delivery,
        why: &str,
    ) -> Result<Option<lapin::message::Delivery>, QueueError> {
        // An id of its own, so its return (if any) is told from another's; the
        // message's own properties and headers kept, for the operator to tell where it
        // came from, and why it is there.
        let move_id = MessageId::new_v7().to_string();
        let props = undecodable_dead_letter(&delivery.properties, &move_id, &why);
        let moved = async {
            let (pch, at) = self.publisher().await?;
            let confirmation = self
                .publish_confirmed(&pch, at, &self.dead_queue, &delivery.data, props)
                .await?;
            let answer = self.answer(&confirmation, &move_id, &self.dead_queue);
            // Its queue deleted by hand: declared again, or every lease would meet this
            // message first, and fail, until another call did.
            self.declare_if_returned(&pch, at, answer, &self.dead_queue)
                .await;
            Ok::<_, QueueError>(answer)
        };
        let answer = match moved.await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(queue = %self.queue, error = %e, "postbox: an undecodable message could not be moved to the dead-letter queue yet");
                return Ok(Some(delivery));
            }
        };
        if answer != Answer::Confirmed {
            // Not moved: give it back to the queue rather than drop it.
            let what = format!(
                "{} (an undecodable message: {why}): {}",
                self.dead_queue,
                answer.refusal()
            );
            return Err(self.give_back(epoch, &delivery.acker, answer, what).await);
        }
        // Counted (and logged at error level) once moved, as by the other backends: a
        // move that failed comes back, and would be counted again.
        tracing::error!(queue = %self.queue, error = %why, "postbox: undecodable message moved to the dead-letter queue");
        metrics::counter!("postbox_queue_quarantined_total").increment(1);
        self.io(epoch, delivery.acker.ack(BasicAckOptions::default()))
            .await?;
        Ok(None)
    }

    /// Tries again to move the undecodable deliveries set aside ([`State::aside`]):
    /// none while publishing is blocked, and none after the first that fails or once
    /// the call timeout has passed (the hold is locked meanwhile, as in
    /// [`make_room`](Self::make_room)). One still not moved after the hold limit is
    /// given back to its queue (held on, it would reach the broker's
    /// `consumer_timeout`, which closes the channel with every lease on it). A move the
    /// broker refuses gave its delivery back, and the others go on.
    async fn move_aside(&self, epoch: u64, st: &mut State) -> Result<(), QueueError> {
        if st.aside.is_empty() {
            return Ok(());
        }
        let until = Instant::now().checked_add(self.timeout);
        let mut stop = self.blocked().is_some();
        for (delivery, why, since) in std::mem::take(&mut st.aside) {
            stop |= until.is_some_and(|until| Instant::now() >= until);
            let step = if stop {
                Ok(Some(delivery))
            } else {
                self.move_undecodable(epoch, delivery, &why).await
            };
            let kept = match step {
                Ok(kept) => kept,
                Err(e) if self.consumer.is_live(epoch) => {
                    tracing::warn!(queue = %self.queue, error = %e, "postbox: an undecodable message set aside was refused by the dead-letter queue; given back");
                    None
                }
                Err(e) => {
                    // The channel is gone, and the rest with it (the broker puts them
                    // back).
                    return Err(e);
                }
            };
            let Some(kept) = kept else { continue };
            stop = true;
            if since.elapsed() <= self.hold_limit {
                st.aside.push((kept, why, since));
            } else {
                self.io(epoch, kept.acker.nack(requeue())).await?;
            }
        }
        Ok(())
    }

    /// Makes room in a full hold for the messages behind it: moves up to `n` (at most
    /// [`MOVE_AT_ONCE`](super::hold::MOVE_AT_ONCE)) held deliveries that are not due at
    /// `now` (those due last) to the main queue's tail with [`park`](Self::park) (a copy
    /// with their not-before and attempts, then an ack of the delivery), if the main
    /// queue has ready messages besides the copies moved before. Without it, a process
    /// holding `max_held` deliveries scheduled for later (the retries of a dependency
    /// that is down) fetches nothing more, and messages that are due — for another
    /// destination — wait behind them until those are due or the hold limit sends them
    /// back. Best effort: a failure ends it (a failed publish leaves the delivery held;
    /// a broken channel is reported by the fetch after it), and it starts no move once
    /// the call timeout has passed (the hold is locked meanwhile). Returns how many
    /// moved.
    async fn make_room(
        &self,
        ch: &Channel,
        epoch: u64,
        st: &mut State,
        n: usize,
        now: SystemTime,
    ) -> usize {
        // No bound for a timeout too long to add (`Duration::MAX`: none).
        let until = Instant::now().checked_add(self.timeout);
        let behind = match self.ready(ch, epoch, &self.queue).await {
            Ok(behind) => behind,
            Err(e) => {
                tracing::debug!(error = %e, "postbox: could not make room in a full hold");
                return 0;
            }
        };
        st.moved.retain(|_, at| at.elapsed() < MOVED_FOR);
        let others = behind.saturating_sub(st.moved.len() as u64);
        let later = due_last(
            st.held.iter().map(|(&id, h)| (id, h.waiting(now))),
            n,
            others,
            now,
        );
        let mut moved = 0;
        for (_, id) in later {
            if until.is_some_and(|until| Instant::now() >= until) {
                break;
            }
            let Some(h) = st.held.remove(&id) else {
                continue;
            };
            // Only a copy in the main queue is behind the others there (one in the
            // delay queue comes back by itself).
            let to_main = match self.park(ch, epoch, h, now).await {
                Ok(Parked::Main) => true,
                Ok(Parked::Delay) => false,
                Ok(Parked::Held(h)) => {
                    // The main queue is full: nothing more goes there now.
                    st.held.insert(id, h);
                    break;
                }
                Ok(Parked::NotCopied(h, e)) => {
                    tracing::debug!(error = %e, "postbox: could not make room in a full hold");
                    st.held.insert(id, h);
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "postbox: could not make room in a full hold");
                    break;
                }
            };
            st.died.remove(&id);
            if to_main {
                st.moved.insert(id, Instant::now());
            }
            moved += 1;
        }
        if moved > 0 {
            tracing::debug!(
                queue = %self.queue,
                moved,
                "postbox: held deliveries not yet due moved to the queue's tail"
            );
        }
        moved
    }

    /// Republishes `h` to the main queue, or to the delay queue with a TTL if its
    /// not-before is further than the hold limit from `now`, then acks the delivery.
    ///
    /// [`Parked::NotCopied`]: the publish failed; the delivery is handed back to be held
    /// here (its channel is not the publishing one, and lives on).
    ///
    /// [`Parked::Held`]: the main queue refused the copy (it is full): the delivery is
    /// handed back to be held here, scheduled, instead of nacked back to the queue,
    /// where it would be due at once and leased again without any backoff. A delivery
    /// held here longer than the hold limit goes to the delay queue instead, for what
    /// is left of its wait: held on, it would reach the broker's `consumer_timeout`,
    /// which closes the channel and ends every lease on it. (The delay queue
    /// dead-letters at least once: a copy due while the main queue is full waits
    /// there for room.)
    async fn park(
        &self,
        ch: &Channel,
        epoch: u64,
        h: Held,
        now: SystemTime,
    ) -> Result<Parked, QueueError> {
        let wait = h
            .envelope
            .not_before
            .duration_since(now)
            .unwrap_or_default();
        let (mut queue, mut ttl) = if wait > self.hold_limit {
            (&self.delay_queue, Some(wait))
        } else {
            (&self.queue, None)
        };
        // Checked first, as `enqueue` does: RabbitMQ applies a quorum queue's
        // `x-max-length` a little late (the nack below is the backstop).
        let full = ttl.is_none()
            && match self.capacity {
                Some(capacity) => self.ready(ch, epoch, &self.queue).await? >= capacity,
                None => false,
            };
        let mut answer = if full {
            Answer::Nacked
        } else {
            match self.publish_copy(queue, &h.envelope, &[], ttl).await {
                Ok(answer) => answer,
                Err(e) => return Ok(Parked::NotCopied(h, e)),
            }
        };
        if answer == Answer::Nacked && ttl.is_none() {
            if h.received.elapsed() <= self.hold_limit {
                tracing::debug!(queue = %queue, id = %h.envelope.id, "postbox: queue full; the retry is held here");
                return Ok(Parked::Held(h));
            }
            tracing::debug!(queue = %queue, id = %h.envelope.id, "postbox: queue full; a retry held past the hold limit waits in the delay queue");
            (queue, ttl) = (&self.delay_queue, Some(wait.max(Duration::from_millis(1))));
            answer = match self.publish_copy(queue, &h.envelope, &[], ttl).await {
                Ok(answer) => answer,
                Err(e) => return Ok(Parked::NotCopied(h, e)),
            };
            if answer == Answer::Nacked {
                return Ok(Parked::Held(h));
            }
        }
        if answer != Answer::Confirmed {
            let what = format!("{queue}: {}", answer.refusal());
            return Err(self.give_back(epoch, &h.acker, answer, what).await);
        }
        self.io(epoch, h.acker.ack(BasicAckOptions::default()))
            .await?;
        Ok(if queue == &self.queue {
            Parked::Main
        } else {
            Parked::Delay
        })
    }

    /// Holds `h` again, scheduled for `not_before`, if its channel (`epoch`) is still
    /// the one the held deliveries belong to: after a reconnect the broker has put the
    /// message back in its queue already, and a delivery on a dead channel can never
    /// be acked (held, it would make the next delivery of the message look like a
    /// duplicate copy, acked and lost).
    ///
    /// A lease may have taken another copy of the message meanwhile (one a lost ack of
    /// an earlier `retry_later` left): that copy goes on, as `lease` keeps a held one
    /// over a second copy, with the later not-before and the higher attempts of the
    /// two, and this delivery is acked away (written over it, the copy's delivery was
    /// never settled, and its lease lost).
    async fn hold_again(&self, h: Held, id: MessageId, not_before: SystemTime, epoch: u64) {
        self.hold_as(
            h,
            id,
            not_before,
            Some(HeldState::Scheduled(not_before)),
            epoch,
        )
        .await;
    }

    /// [`hold_again`](Self::hold_again), in `state` (`None`: as `h` was, its lease going
    /// on).
    async fn hold_as(
        &self,
        mut h: Held,
        id: MessageId,
        not_before: SystemTime,
        state: Option<HeldState>,
        epoch: u64,
    ) {
        let mut st = self.state.lock().await;
        if st.epoch != epoch {
            return;
        }
        let extra = match st.held.entry(id) {
            Entry::Vacant(slot) => {
                if let Some(state) = state {
                    h.state = state;
                }
                slot.insert(h);
                return;
            }
            Entry::Occupied(mut slot) => {
                slot.get_mut().absorb_copy(not_before, h.envelope.attempts);
                h
            }
        };
        drop(st);
        tracing::warn!(queue = %self.queue, %id, "postbox: duplicate copy of a held message acked");
        if let Err(e) = self
            .io(epoch, extra.acker.ack(BasicAckOptions::default()))
            .await
        {
            // Its channel is gone then: the broker puts the delivery back.
            tracing::debug!(queue = %self.queue, %id, error = %e, "postbox: duplicate copy not acked");
        }
    }

    /// The broker's copy of `id` left the queue (acked: a parked copy starts its own
    /// delivery count): its uncounted deliveries are forgotten. (`lease`, which parks
    /// under the state lock, forgets them itself.)
    async fn gone(&self, id: MessageId) {
        let mut st = self.state.lock().await;
        if !st.died.is_empty() {
            st.died.remove(&id);
        }
    }

    /// After the publish that was to move a delivery was refused (`what`: where, and
    /// how): nacks the delivery back to its queue (delivered again, counted) so it is
    /// never left unacked on this channel, and returns the error to answer.
    async fn give_back(
        &self,
        epoch: u64,
        acker: &lapin::acker::Acker,
        answer: Answer,
        what: String,
    ) -> QueueError {
        if let Err(e) = self.io(epoch, acker.nack(requeue())).await {
            return e;
        }
        answer.error(what)
    }

    /// Removes the delivery of `token` if its lease is current.
    fn take(st: &mut State, token: LeaseToken) -> Result<Held, QueueError> {
        match st.held.get(&token.id) {
            Some(h) if matches!(h.state, HeldState::Leased(_, g) if g == token.generation) => st
                .held
                .remove(&token.id)
                .ok_or(QueueError::LeaseLost(token)),
            _ => Err(QueueError::LeaseLost(token)),
        }
    }

    /// Checks that the held deliveries still belong to the live channel.
    async fn current(&self) -> Result<(Channel, u64), QueueError> {
        let (ch, epoch) = self.channel().await?;
        let mut st = self.state.lock().await;
        Self::follow(&mut st, epoch)?;
        Ok((ch, epoch))
    }

    /// Moves the held state to the channel of `epoch` if it is newer: the old channel is
    /// gone and the broker requeued its deliveries. A caller holding an older channel
    /// than the state's (it was replaced while the caller waited) must not reset it.
    fn follow(st: &mut State, epoch: u64) -> Result<(), QueueError> {
        if st.epoch < epoch {
            if st.died.len() > UNCOUNTED_MAX {
                st.died.clear();
            }
            // On the dead channel: the broker puts them back.
            st.aside.clear();
            for (id, h) in std::mem::take(&mut st.held) {
                let died = st.died.entry(id).or_default();
                if matches!(h.state, HeldState::Scheduled(_)) {
                    died.uncounted += 1;
                }
                died.counted = died.counted.max(h.envelope.attempts);
            }
            st.epoch = epoch;
        } else if st.epoch > epoch {
            return Err(QueueError::Unavailable(
                "amqp: the channel was replaced during the call".into(),
            ));
        }
        Ok(())
    }

    async fn ack(&self, tokens: &[LeaseToken]) -> Result<(), QueueError> {
        let (_, epoch) = self.current().await?;
        let mut lost = None;
        let mut taken = Vec::with_capacity(tokens.len());
        {
            let mut st = self.state.lock().await;
            for &t in tokens {
                match Self::take(&mut st, t) {
                    Ok(h) => taken.push(h),
                    Err(e) => {
                        lost.get_or_insert(e);
                    }
                }
            }
        }
        for h in taken {
            self.io(epoch, h.acker.ack(BasicAckOptions::default()))
                .await?;
            self.forget_key(&h.envelope.idempotency_key, h.envelope.id);
            self.gone(h.envelope.id).await;
        }
        lost.map_or(Ok(()), Err)
    }

    async fn retry_later(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> Result<(), QueueError> {
        let (ch, epoch) = self.current().await?;
        let mut st = self.state.lock().await;
        let mut h = Self::take(&mut st, token)?;
        let now = st.now();
        drop(st);
        h.envelope.not_before = not_before;
        match self.park(&ch, epoch, h, now).await? {
            // No room for the copy (a full queue is when retries pile up), or no publish
            // (an alarm blocks the publishing connection): held here, scheduled, this
            // attempt counted. Only a lost connection loses the new not-before (the
            // broker delivers it again at once, counted).
            Parked::Held(h) => self.hold_again(h, token.id, not_before, epoch).await,
            Parked::NotCopied(h, e) => {
                tracing::warn!(queue = %self.queue, id = %token.id, error = %e, "postbox: a retry could not be republished; held here until it is due");
                self.hold_again(h, token.id, not_before, epoch).await;
            }
            Parked::Main | Parked::Delay => self.gone(token.id).await,
        }
        Ok(())
    }

    /// Like `retry_later`, with the delivery uncounted: a not-before within the hold
    /// limit is kept here, in memory, and nothing goes to the broker; a later one is
    /// parked in the delay queue with the uncounted attempts.
    async fn release(&self, token: LeaseToken, not_before: SystemTime) -> Result<(), QueueError> {
        let (ch, epoch) = self.current().await?;
        let mut st = self.state.lock().await;
        let mut h = Self::take(&mut st, token)?;
        h.envelope.attempts = h.envelope.attempts.saturating_sub(1);
        h.envelope.not_before = not_before;
        let now = st.now();
        if not_before
            .duration_since(now)
            .is_ok_and(|wait| wait > self.hold_limit)
        {
            drop(st);
            match self.park(&ch, epoch, h, now).await? {
                Parked::Held(h) | Parked::NotCopied(h, _) => {
                    self.hold_again(h, token.id, not_before, epoch).await;
                }
                Parked::Main | Parked::Delay => self.gone(token.id).await,
            }
            return Ok(());
        }
        h.state = HeldState::Scheduled(not_before);
        st.held.insert(token.id, h);
        Ok(())
    }

    async fn dead_letter(&self, token: LeaseToken, reason: &str) -> Result<(), QueueError> {
        let (_, epoch) = self.current().await?;
        let h = Self::take(&mut *self.state.lock().await, token)?;
        let extra = [(H_REASON, string(cut(reason, MAX_HEADER_TEXT)))];
        let answer = match self
            .publish_copy(&self.dead_queue, &h.envelope, &extra, None)
            .await
        {
            Ok(answer) => answer,
            // Held again as it was, its lease going on: the caller may try again.
            Err(e) => {
                let not_before = h.envelope.not_before;
                self.hold_as(h, token.id, not_before, None, epoch).await;
                return Err(e);
            }
        };
        if answer != Answer::Confirmed {
            let what = format!("{}: {}", self.dead_queue, answer.refusal());
            return Err(self.give_back(epoch, &h.acker, answer, what).await);
        }
        self.io(epoch, h.acker.ack(BasicAckOptions::default()))
            .await?;
        self.forget_key(&h.envelope.idempotency_key, h.envelope.id);
        self.gone(h.envelope.id).await;
        Ok(())
    }

    async fn ready(&self, ch: &Channel, epoch: u64, queue: &str) -> Result<u64, QueueError> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = self
            .io(
                epoch,
                ch.queue_declare(queue, passive, FieldTable::default()),
            )
            .await?;
        Ok(u64::from(q.message_count()))
    }

    /// The messages ready in each of the three queues, read with passive declares on
    /// `ch`.
    async fn ready_in_each(&self, ch: &Channel) -> lapin::Result<[u64; 3]> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let mut counts = [0; 3];
        for (count, queue) in
            counts
                .iter_mut()
                .zip([&self.queue, &self.delay_queue, &self.dead_queue])
        {
            let declare = ch.queue_declare(queue, passive, FieldTable::default());
            *count = u64::from(timed(self.timeout, declare).await?.message_count());
        }
        Ok(counts)
    }

    async fn depth(&self) -> Result<Depth, QueueError> {
        // On a channel of its own: a passive declare of a queue deleted by hand closes
        // its channel, and on the shared one the broker would requeue every delivery
        // leased on it (the replayer asks for the depth every poll).
        let (ch, epoch) = self.own_channel().await?;
        let counted = self.ready_in_each(&ch).await;
        if counted.is_ok() {
            let _ = timed(self.timeout, ch.close(200, "depth")).await;
        }
        let [main, delayed, dead] = match counted {
            Ok(counts) => counts,
            Err(e) => return Err(self.failed_on_own_channel(e, epoch, "depth").await),
        };
        let ready = main + delayed;
        let st = self.state.lock().await;
        let in_flight = st
            .held
            .values()
            .filter(|h| matches!(h.state, HeldState::Leased(..)))
            .count() as u64;
        let held = st.held.len() as u64 - in_flight;
        Ok(Depth {
            pending: ready + held,
            in_flight,
            // Undecodable messages set aside, bound for the dead letters.
            dead: dead + st.aside.len() as u64,
        })
    }

    /// Reads dead letters on a channel of its own, then closes it so the broker puts
    /// them back in order.
    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        self.walk_dead("inspected", |delivery| {
            let Ok(envelope) = Envelope::decode(&delivery.data) else {
                tracing::warn!(queue = %self.dead_queue, "postbox: undecodable dead letter skipped");
                return Walk::Keep;
            };
            let reason = delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(H_REASON).and_then(as_string))
                .unwrap_or_default();
            // A dead letter is not live: if this process still holds its key for it
            // (another process dead-lettered it), the key is free, or a redrive of it
            // would be answered `Duplicate` of itself and its dead letter discarded.
            self.forget_key(&envelope.idempotency_key, envelope.id);
            out.push(DeadLetter { envelope, reason });
            if out.len() < max {
                Walk::Keep
            } else {
                Walk::Stop
            }
        })
        .await?;
        Ok(out)
    }

    /// Takes the dead letters `ids` off the dead-letter queue (acked on a channel of
    /// its own; an id as often as it is listed: see `WantedIds`); the others go back in
    /// order when it closes.
    async fn discard_dead_letters(&self, ids: &[MessageId]) -> Result<u64, QueueError> {
        let mut wanted = super::WantedIds::new(ids.iter().copied());
        if wanted.is_empty() {
            return Ok(0);
        }
        self.walk_dead("discarded", |delivery| {
            if !Envelope::decode(&delivery.data).is_ok_and(|e| wanted.take(&e.id)) {
                Walk::Keep
            } else if wanted.is_empty() {
                Walk::TakeAndStop
            } else {
                Walk::Take
            }
        })
        .await
    }

    /// Gets the dead letters one by one on a channel of its own, oldest first, while
    /// `visit` asks for more, and acks those it takes; closing the channel puts the
    /// rest back in order. Returns how many were taken.
    async fn walk_dead(
        &self,
        why: &str,
        mut visit: impl FnMut(&lapin::message::Delivery) -> Walk,
    ) -> Result<u64, QueueError> {
        let (ch, epoch) = self.own_channel().await?;
        let mut taken = 0;
        let result = async {
            // The last delivery left, with every one before it: put back below; and
            // how many were left, with how many the queue had behind the last one got.
            let (mut kept, mut left, mut behind) = (None, 0, 0);
            loop {
                let get = ch.basic_get(&self.dead_queue, BasicGetOptions { no_ack: false });
                let got = timed(self.timeout, get).await?;
                let Some(m) = got else { break };
                behind = m.message_count;
                let walk = visit(&m.delivery);
                if matches!(walk, Walk::Take | Walk::TakeAndStop) {
                    let ack = m.delivery.acker.ack(BasicAckOptions::default());
                    timed(self.timeout, ack).await?;
                    taken += 1;
                } else {
                    kept = Some(m.delivery.acker.clone());
                    left += 1;
                }
                if matches!(walk, Walk::Stop | Walk::TakeAndStop) {
                    break;
                }
            }
            // Put back in place now rather than when the channel closes, and waited for
            // (bounded): the broker requeues in the background, and a `depth` right
            // after this would miss dead letters not back yet.
            if let Some(acker) = kept {
                let all = BasicNackOptions {
                    multiple: true,
                    requeue: true,
                };
                timed(self.timeout, acker.nack(all)).await?;
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                // Bounded even without a timeout: dead letters taken or purged by
                // another process meanwhile would keep the count short for ever.
                let until = Instant::now() + self.timeout.min(Duration::from_secs(5));
                loop {
                    let declare =
                        ch.queue_declare(&self.dead_queue, passive, FieldTable::default());
                    let ready = timed(self.timeout, declare).await?.message_count();
                    if ready >= left + behind || Instant::now() >= until {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Ok::<(), lapin::Error>(())
        }
        .await;
        // The broker answers the close after the acks before it: once closed, they
        // are applied.
        let closed = timed(self.timeout, ch.close(200, why)).await;
        match result.and(if taken > 0 { closed } else { Ok(()) }) {
            Ok(()) => Ok(taken),
            Err(e) => Err(self.failed_on_own_channel(e, epoch, "dead letters").await),
        }
    }

    /// A channel of its own on the current connection, for calls the broker may refuse
    /// by closing their channel (a queue deleted by hand): the shared channel, and the
    /// deliveries leased on it, are not closed with it.
    async fn own_channel(&self) -> Result<(Channel, u64), QueueError> {
        let (_, epoch) = self.current().await?;
        let conn = {
            let link = self.consumer.link.lock().await;
            let Some(l) = link.as_ref() else {
                return Err(QueueError::Unavailable("amqp: not connected".into()));
            };
            l.conn.clone()
        };
        let ch = self.io(epoch, conn.create_channel()).await?;
        Ok((ch, epoch))
    }

    /// The error of a call on a channel of its own ([`own_channel`](Self::own_channel)).
    /// A refusal (a queue deleted by hand) closed only that channel: the connection,
    /// and the deliveries leased on it, are kept (closed, the broker would requeue
    /// every one); a missing queue is declared again for the next call. Anything else
    /// fails the connection, as on the shared channel.
    async fn failed_on_own_channel(&self, e: lapin::Error, epoch: u64, what: &str) -> QueueError {
        match soft_error(&e) {
            Some(soft) => {
                if soft == AMQPSoftError::NOTFOUND
                    && let Ok((main, epoch)) = self.channel().await
                    && let Err(e) = self.io(epoch, self.declare(&main)).await
                {
                    tracing::warn!(error = %e, "postbox: could not declare the queues again");
                }
                classify(e, what)
            }
            None => self.fail(e, epoch).await,
        }
    }
}

/// The properties of the dead letter an undecodable message becomes: its headers,
/// content type, content encoding, correlation id, timestamp, type and app id,
/// persistent, with `message_id` (its original one in `postbox-original-message-id`)
/// and `postbox-reason: undecodable: …`. Not its expiration (a dead letter waits for an
/// operator), its user id (the broker refuses one that is not the connection's), nor
/// its priority, reply-to or cluster id.
fn undecodable_dead_letter(
    original: &BasicProperties,
    message_id: &str,
    why: &dyn std::fmt::Display,
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    let reason = format!("undecodable: {why}");
    headers.insert(H_REASON.into(), string(cut(&reason, MAX_HEADER_TEXT)));
    if let Some(id) = original.message_id() {
        headers.insert(
            "postbox-original-message-id".into(),
            AMQPValue::LongString(id.as_str().into()),
        );
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(message_id.into())
        .with_headers(headers);
    if let Some(v) = original.content_type() {
        props = props.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        props = props.with_content_encoding(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        props = props.with_correlation_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        props = props.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        props = props.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        props = props.with_app_id(v.clone());
    }
    props
}

/// `call`, failed as a missed heartbeat if the broker does not answer within `limit`.
async fn timed<T>(
    limit: Duration,
    call: impl Future<Output = lapin::Result<T>>,
) -> lapin::Result<T> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(ErrorKind::MissingHeartbeatError.into()))
}

/// What [`Inner::walk_dead`] does with the dead letter it got.
enum Walk {
    /// Leave it (it goes back at close) and get the next.
    Keep,
    /// Leave it and stop.
    Stop,
    /// Ack it (it is deleted) and get the next.
    Take,
    /// Ack it and stop.
    TakeAndStop,
}

impl fmt::Debug for AmqpQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpQueue")
            .field("queue", &self.inner.queue)
            .field("capacity", &self.inner.capacity)
            .finish_non_exhaustive()
    }
}

impl Queue for AmqpQueue {
    fn enqueue(
        &self,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Enqueued, QueueError>> + Send {
        self.inner.enqueue(envelope)
    }

    fn lease(
        &self,
        max: usize,
        lease_for: Duration,
        now: SystemTime,
    ) -> impl Future<Output = Result<Vec<Leased>, QueueError>> + Send {
        // On a task of its own too: dropped while the broker answered a `basic_get`,
        // it left the delivery unacked on the channel and in no hold, stranded until
        // the channel closed. Now what it takes is leased (to no one) and comes back
        // when that lease ends, as the embedded queue's does.
        let inner = self.inner.clone();
        settling(async move { inner.lease(max, lease_for, now).await })
    }

    // The calls that settle a lease run to the end on a task of their own (see
    // `super::settling`): dropped halfway, one would leave a delivery it took out of
    // the hold unacked on the channel until RabbitMQ's `consumer_timeout` closes the
    // channel, ending every lease on it.

    fn ack(&self, tokens: &[LeaseToken]) -> impl Future<Output = Result<(), QueueError>> + Send {
        let (inner, tokens) = (self.inner.clone(), tokens.to_vec());
        settling(async move { inner.ack(&tokens).await })
    }

    fn retry_later(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        let inner = self.inner.clone();
        settling(async move { inner.retry_later(token, not_before).await })
    }

    fn release(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        let inner = self.inner.clone();
        settling(async move { inner.release(token, not_before).await })
    }

    fn dead_letter(
        &self,
        token: LeaseToken,
        reason: &str,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        let (inner, reason) = (self.inner.clone(), reason.to_owned());
        settling(async move { inner.dead_letter(token, &reason).await })
    }

    fn depth(&self) -> impl Future<Output = Result<Depth, QueueError>> + Send {
        self.inner.depth()
    }

    fn dead_letters(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, QueueError>> + Send {
        self.inner.dead_letters(max)
    }

    fn discard_dead_letters(
        &self,
        ids: &[MessageId],
    ) -> impl Future<Output = Result<u64, QueueError>> + Send {
        self.inner.discard_dead_letters(ids)
    }
}

// === helpers ===

/// A message returned to a publish it was not its own (see
/// `Inner::publish_returned_again`): routing key, body, properties, and how many times it
/// came back already when published again.
type Orphan = (lapin::types::ShortString, Vec<u8>, BasicProperties, u32);

/// `returned` as an [`Orphan`] not yet published again.
fn orphan(returned: &lapin::message::BasicReturnMessage) -> Orphan {
    let d = &returned.delivery;
    (
        d.routing_key.clone(),
        d.data.clone(),
        d.properties.clone(),
        0,
    )
}

/// A publish waiting for its confirm ([`Inner::publish_confirmed`]). Dropped before the
/// confirm came (the timeout passed, or the caller stopped waiting), it hands the
/// confirm to a task of its own, which publishes again a return it carries (another
/// call's message: see [`Inner::publish_returned_again`]). (Dropped with it, lapin would
/// keep that return for `wait_for_confirms`, and the message it belongs to, answered as
/// confirmed, was lost.)
struct Pending<'a> {
    inner: &'a Inner,
    ch: &'a Channel,
    epoch: u64,
    /// The publish was started: dropped before its confirm was handed over, lapin
    /// keeps the confirm (see [`Inner::reap`]).
    started: bool,
    confirm: Option<lapin::publisher_confirm::PublisherConfirm>,
}

impl Pending<'_> {
    async fn publish(
        &mut self,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> lapin::Result<Confirmation> {
        self.started = true;
        let confirm = self
            .ch
            .basic_publish("", routing_key, mandatory(), payload, props)
            .await;
        self.started = false;
        let c = self.confirm.insert(confirm?).await;
        self.confirm = None;
        c
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.started {
            self.inner.reap_soon(self.ch, self.epoch);
        }
        let Some(confirm) = self.confirm.take() else {
            return;
        };
        let Some((inner, rt)) = self.inner.beside("a return a given-up confirm may carry") else {
            return;
        };
        rt.spawn(async move {
            let waited = tokio::time::timeout(inner.timeout, confirm).await;
            if let Ok(Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)))) = waited {
                inner.publish_returned_again(vec![orphan(&r)]).await;
            }
        });
    }
}

/// How the broker answered a publish with a confirm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Confirmed: stored (durably, on a quorum queue) in the queue it was sent to.
    Confirmed,
    /// Nacked: refused, for example by a full queue (`reject-publish`).
    Nacked,
    /// Returned as unroutable (`mandatory`): no queue of that name, it was deleted.
    Returned,
}

impl Answer {
    /// The answer to the publish of message `id` to `routing_key`, and a returned
    /// message that is another publish's (see `publish_returned_again`). The id's text
    /// is made only for a confirm that carries a return.
    fn of<'c>(
        c: &'c Confirmation,
        id: &(dyn fmt::Display + Sync),
        routing_key: &str,
    ) -> (Self, Option<&'c lapin::message::BasicReturnMessage>) {
        let (acked, returned) = match c {
            Confirmation::Ack(r) => (true, r.as_deref()),
            Confirmation::Nack(r) => (false, r.as_deref()),
            Confirmation::NotRequested => (true, None),
        };
        let own = returned.is_some_and(|r| {
            let d = &r.delivery;
            d.routing_key.as_str() == routing_key
                && d.properties
                    .message_id()
                    .as_ref()
                    .is_some_and(|m| m.as_str() == id.to_string())
        });
        if own {
            (Answer::Returned, None)
        } else if acked {
            (Answer::Confirmed, returned)
        } else {
            (Answer::Nacked, returned)
        }
    }

    /// The error for a publish to `what` that was not confirmed: a returned one is
    /// [`QueueError::Unavailable`], as the queue was declared again (see `publish`) and a
    /// new try succeeds; a nacked one is [`QueueError::Backend`].
    fn error(self, what: String) -> QueueError {
        let msg = format!("amqp: {what}");
        match self {
            Answer::Returned => QueueError::Unavailable(msg.into()),
            Answer::Confirmed | Answer::Nacked => QueueError::Backend(msg.into()),
        }
    }

    /// Why a publish that was not confirmed was refused, for an error message.
    fn refusal(self) -> &'static str {
        match self {
            Answer::Confirmed => "confirmed",
            Answer::Nacked => "the broker refused the publish (nack)",
            Answer::Returned => "no such queue: the publish came back unroutable",
        }
    }
}

/// Publish options: `mandatory`, so a publish to a queue that does not exist is returned
/// (see [`Answer::Returned`]), not confirmed and dropped.
fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    }
}

/// A nack that returns the delivery to its queue.
fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    }
}

/// Where [`AmqpQueue`]'s `park` put a delivery.
enum Parked {
    /// Republished to the main queue (confirmed) and acked.
    Main,
    /// Republished to the delay queue (confirmed) and acked.
    Delay,
    /// Not republished (the main queue is full): to be held here again.
    Held(Held),
    /// Not republished: the publish failed (a memory or disk alarm blocks the publishing
    /// connection, or it broke) while the delivery's channel lives on. To be held here
    /// again; nothing more is worth trying to publish now.
    NotCopied(Held, QueueError),
}

/// The most times a returned message is published again when it fails or keeps coming
/// back (see `publish_returned_again`).
const MAX_PUBLISH_AGAIN: u32 = 8;

/// The longest text put in a header (see `publish`).
const MAX_HEADER_TEXT: usize = 4096;

/// `s` cut to at most `max` bytes, at a character's end.
fn cut(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn as_string(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(ShortString::as_str(s).to_owned()),
        _ => None,
    }
}

fn as_i64(v: &AMQPValue) -> Option<i64> {
    match *v {
        AMQPValue::LongLongInt(i) => Some(i),
        AMQPValue::LongInt(i) => Some(i64::from(i)),
        AMQPValue::LongUInt(i) => Some(i64::from(i)),
        AMQPValue::ShortInt(i) => Some(i64::from(i)),
        AMQPValue::ShortUInt(i) => Some(i64::from(i)),
        AMQPValue::ShortShortInt(i) => Some(i64::from(i)),
        AMQPValue::ShortShortUInt(i) => Some(i64::from(i)),
        _ => None,
    }
}

/// The refusal by the broker that closed only the channel it came on (an AMQP soft
/// error: a queue not found, a precondition failed), not the connection.
fn soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        ErrorKind::ProtocolError(p) => match p.kind() {
            lapin::protocol::AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            lapin::protocol::AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// I/O and connection or channel state errors are [`QueueError::Unavailable`]; a
/// refusal by the broker (an AMQP error reply) is a backend error.
fn classify(e: lapin::Error, what: &str) -> QueueError {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError};
    let msg = format!("amqp {what}: {e}");
    match e.kind() {
        // The broker closing the connection as it shuts down or restarts (or an operator
        // closing it), a queue that is gone (the next connection declares it again), an
        // internal error: a later call may well succeed.
        ErrorKind::ProtocolError(p)
            if matches!(
                p.kind(),
                AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED | AMQPHardError::INTERNALERROR)
                    | AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)
            ) =>
        {
            QueueError::Unavailable(msg.into())
        }
        ErrorKind::ProtocolError(_)
        | ErrorKind::ParsingError(_)
        | ErrorKind::SerialisationError(_)
        | ErrorKind::InvalidProtocolVersion(_)
        | ErrorKind::NoConfiguredExecutor
        | ErrorKind::NoConfiguredReactor => QueueError::Backend(msg.into()),
        _ => QueueError::Unavailable(msg.into()),
    }
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
}

fn ms_floor(t: SystemTime) -> i64 {
    i64::try_from(since_epoch(t).as_millis()).unwrap_or(i64::MAX)
}

fn ms_ceil(t: SystemTime) -> i64 {
    let ms = ms_floor(t);
    if since_epoch(t).subsec_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms.saturating_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key index stays bounded when keys are only forgotten by age (other processes
    /// ack the messages): the older half of the confirmed claims goes once more than
    /// half the bound remain; claims still publishing stay.
    #[test]
    fn the_key_index_forgets_the_oldest_confirmed_keys_past_its_bound() {
        let t0 = Instant::now();
        let mut keys = HashMap::new();
        let mut publishing = Vec::new();
        for i in 0..10u64 {
            let stored = i % 5 != 4;
            if !stored {
                publishing.push(i); // still waiting for its confirm
            }
            let claim = Claim {
                id: MessageId::new_v7(),
                at: t0 + Duration::from_secs(i),
                stored,
                waited: false,
            };
            keys.insert(format!("k{i}"), claim);
        }
        let now = t0 + Duration::from_secs(20);
        let day = Duration::from_secs(24 * 3600);
        prune(&mut keys, now, day, 100);
        assert_eq!(keys.len(), 10, "under the bound: only the window prunes");
        prune(&mut keys, now, day, 8);
        let mut left: Vec<_> = keys.keys().cloned().collect();
        left.sort();
        // Confirmed: k0-k3, k5-k8; the newer half (k5-k8) stays, with both publishing.
        assert_eq!(left, ["k4", "k5", "k6", "k7", "k8", "k9"]);
        drop(publishing);
    }

    #[test]
    fn a_broker_shutting_down_or_a_missing_queue_is_unavailable_a_refusal_is_a_backend_error() {
        use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
        let protocol =
            |kind| lapin::Error::from(ErrorKind::ProtocolError(AMQPError::new(kind, "x".into())));
        for kind in [
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            AMQPErrorKind::Hard(AMQPHardError::INTERNALERROR),
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
        ] {
            let e = classify(protocol(kind.clone()), "call");
            assert!(matches!(e, QueueError::Unavailable(_)), "{kind:?}: {e:?}");
        }
        for kind in [
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            AMQPErrorKind::Hard(AMQPHardError::FRAMEERROR),
        ] {
            let e = classify(protocol(kind.clone()), "call");
            assert!(matches!(e, QueueError::Backend(_)), "{kind:?}: {e:?}");
        }
    }

    /// Needs RabbitMQ on 127.0.0.1:5672 (or `POSTBOX_AMQP_URL`); fails if it is down.
    /// The queue's live consumer connection.
    async fn consumer_connection(q: &AmqpQueue) -> Arc<Connection> {
        let link = q.inner.consumer.link.lock().await;
        link.as_ref().unwrap().conn.clone()
    }

    #[tokio::test]
    async fn a_connection_replaced_after_an_error_is_closed() {
        let name = format!("unit-close-{}", MessageId::new_v7());
        let q = AmqpQueue::connect(AmqpOptions::new(&name))
            .await
            .expect("RabbitMQ must answer on 127.0.0.1:5672 (see shared/services.md)");
        let (_, epoch) = q.inner.channel().await.unwrap();
        let old = consumer_connection(&q).await;
        assert!(old.status().connected());
        // An error on a call while the connection itself is fine (a channel-level
        // failure): the link is dropped and the next call connects anew.
        let err = lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
            lapin::ChannelState::Closed,
            "test",
        ));
        q.inner.fail(err, epoch).await;
        let (_, new_epoch) = q.inner.channel().await.unwrap();
        assert_ne!(new_epoch, epoch);
        for _ in 0..100 {
            if !old.status().connected() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !old.status().connected(),
            "the old connection was left open"
        );
        let (ch, _) = q.inner.channel().await.unwrap();
        for queue in [&q.inner.queue, &q.inner.delay_queue, &q.inner.dead_queue] {
            let _ = ch.queue_delete(queue, Default::default()).await;
        }
    }

    /// Needs RabbitMQ on 127.0.0.1:5672 (or `POSTBOX_AMQP_URL`); fails if it is down.
    /// A connection given up after a call timed out is closed (it used to be left open,
    /// with its socket and heartbeats, for the life of the process), and the delivery
    /// it held comes back to the next lease, on a new connection.
    #[tokio::test]
    async fn a_connection_given_up_after_a_timeout_is_closed_and_its_delivery_comes_back() {
        let name = format!("unit-timeout-{}", MessageId::new_v7());
        let q = AmqpQueue::connect(AmqpOptions::new(&name))
            .await
            .expect("RabbitMQ must answer on 127.0.0.1:5672 (see shared/services.md)");
        let e = Envelope::new(
            "api:443",
            "POST",
            "https://api/orders",
            "x",
            crate::queue::DeferReason::RetriesExhausted,
        );
        let now = SystemTime::now();
        q.enqueue(e.clone()).await.unwrap();
        let leased = q.lease(1, Duration::from_secs(30), now).await.unwrap();
        assert_eq!(leased.len(), 1);
        let (_, epoch) = q.inner.channel().await.unwrap();
        let old = consumer_connection(&q).await;
        q.inner.drop_link(epoch).await;
        let mut again = Vec::new();
        for _ in 0..100 {
            again = q.lease(1, Duration::from_secs(30), now).await.unwrap();
            if !again.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !old.status().connected(),
            "the old connection was left open"
        );
        assert_eq!(
            again.len(),
            1,
            "the delivery held by the old connection did not come back"
        );
        assert_eq!(again[0].envelope.id, e.id);
        q.purge().await.unwrap();
    }

    /// Needs RabbitMQ on 127.0.0.1:5672 (or `POSTBOX_AMQP_URL`); fails if it is down.
    /// A delivery held again after its park found no room (`retry_later`, `release`)
    /// while a lease took another copy of the same message (one a lost ack left) keeps
    /// that copy and its lease, and the extra delivery is acked away: it overwrote the
    /// copy, whose delivery was then never settled (and its lease lost).
    #[tokio::test]
    async fn a_delivery_held_again_beside_another_copy_keeps_the_copy_and_acks_itself() {
        let name = format!("unit-hold-again-{}", MessageId::new_v7());
        let q = AmqpQueue::connect(AmqpOptions::new(&name))
            .await
            .expect("RabbitMQ must answer on 127.0.0.1:5672 (see shared/services.md)");
        let mut e = Envelope::new(
            "api",
            "POST",
            "http://api/x",
            "",
            super::super::DeferReason::CircuitOpen,
        );
        e.idempotency_key = String::new(); // keyless: stored twice, one id
        let now = SystemTime::now();
        for _ in 0..2 {
            q.enqueue(e.clone()).await.unwrap();
        }
        let lease_for = Duration::from_secs(30);
        let first = q.lease(1, lease_for, now).await.unwrap();
        assert_eq!(first.len(), 1);
        // As `retry_later` does before it parks: the delivery out of the hold.
        let (h, epoch) = {
            let mut st = q.inner.state.lock().await;
            (Inner::take(&mut st, first[0].token).unwrap(), st.epoch)
        };
        let second = q.lease(1, lease_for, now).await.unwrap();
        assert_eq!(second.len(), 1, "the other copy");
        assert_eq!(second[0].envelope.id, e.id);
        let later = now + Duration::from_secs(3600);
        q.inner.hold_again(h, e.id, later, epoch).await;
        q.ack(&[second[0].token]).await.unwrap();
        let depth = q.depth().await.unwrap();
        assert_eq!((depth.pending, depth.in_flight), (0, 0), "{depth:?}");
        q.purge().await.unwrap();
    }
}
