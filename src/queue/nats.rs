//! [`NatsQueue`]: a [`Queue`] on NATS JetStream (feature `nats`).
//!
//! # Example
//! ```no_run
//! use postbox::queue::{DeferReason, Envelope, NatsOptions, NatsQueue, Queue};
//! use std::time::{Duration, SystemTime};
//!
//! # async fn run() -> Result<(), postbox::queue::QueueError> {
//! // URL from `POSTBOX_NATS_URL`, else nats://127.0.0.1:4222
//! let queue = NatsQueue::connect(NatsOptions::new("orders")).await?;
//! let env = Envelope::new("api:443", "POST", "https://api/orders", "{}", DeferReason::CircuitOpen);
//! queue.enqueue(env).await?;
//! for leased in queue.lease(10, Duration::from_secs(30), SystemTime::now()).await? {
//!     queue.ack(&[leased.token]).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout in JetStream
//!
//! A queue named `NAME` is two streams (file storage):
//!
//! | stream | subjects | retention | holds |
//! |---|---|---|---|
//! | `POSTBOX_NAME` | `postbox.NAME.k.<key>` | work queue | the live messages (pending or in flight) |
//! | `POSTBOX_NAME_DEAD` | `postbox.NAME.dead` | limits | the dead letters, oldest first |
//!
//! and one durable pull consumer, `postbox`, on `POSTBOX_NAME` (explicit acks,
//! `max_deliver: -1`: giving up after too many attempts is the replayer's decision, made
//! with a dead letter; a server-side limit would leave the message stuck in the stream).
//!
//! `<key>` is the idempotency key in lowercase hex (`x` then the hex; keys over 100 bytes
//! are `s` then the hex SHA-256 of the key; an empty key is `id-` then the message id). So
//! **one subject per idempotency key**, and the enqueue publishes with
//! `Nats-Expected-Last-Subject-Sequence: 0`: the server stores the message only if no
//! message with that key is in the stream. Because the stream is a work queue, a message
//! leaves it when acked or dead-lettered, and the key is free again — exactly the
//! trait's de-duplication, enforced by the server, with no window. A publish retried
//! after a lost reply is refused the same way while the first copy is in the stream,
//! and answered [`Enqueued::Duplicate`] with the message's own id; once that copy is
//! acked, the retry is stored again, and the receiver's idempotency layer (the key
//! travels with the request) makes the effect happen once. A keyed enqueue sets no
//! `Nats-Msg-Id`: the server's window of message ids cost 10–40 % of its throughput. A
//! message with no key goes on a subject of its own (`id-` and its id) with the same
//! check, and keeps its id as `Nats-Msg-Id`, so its retried publish is also dropped for
//! the stream's `duplicate_window` after the first copy left (nothing downstream would
//! catch it).
//!
//! Every message's payload is the versioned envelope (`docs/envelope.md`), with headers:
//! `Postbox-Id` (UUID text), `Nats-Msg-Id` (the same, on a keyless enqueue),
//! `Postbox-Idempotency-Key`,
//! `Postbox-Destination` (these two only when they are printable ASCII),
//! `Postbox-Not-Before` (Unix milliseconds), and `Postbox-Attempts` once it is not 0.
//! A dead letter adds `Postbox-Reason`, and its payload carries the attempts and
//! not-before it died with.
//!
//! # Leases
//!
//! A lease is a delivery of the pull consumer that *this process* holds unacked. Lease
//! deadlines and not-before are judged against the `now` passed to
//! [`lease`](Queue::lease), as the trait says; the consumer's `ack_wait`
//! ([`NatsOptions::with_ack_wait`], default 30 s) is the crash lease: if the process
//! dies, the server delivers its messages again after `ack_wait`, and their attempts
//! count that delivery — also for a delivery that was only held, waiting for its
//! not-before, and also after a clean restart (a process keeps no record of what it
//! held: the server's delivery count is all the next one has). While the process lives a background task (spawned by
//! [`connect`](NatsQueue::connect)) keeps its held messages with in-progress acks
//! (`+WPI`) every `ack_wait / 4` (the consumer's on the server, read again every
//! second), however rarely `lease` is called (a replayer paused by an open breaker, or
//! busy with slow replays). A [`LeaseToken`] is only valid in the process that leased
//! it.
//!
//! `retry_later` republishes the message with the new `Postbox-Not-Before` and
//! `Postbox-Attempts` and then acks the delivery, so the delay survives a restart. If
//! the subject's last message is a newer copy of the same message (an earlier move or
//! retry of this delivery stored it, then its ack was lost), the republish goes after
//! that copy and deletes it; anything else there means the message was settled
//! elsewhere, and the lease is lost.
//! `release` (a delivery the replayer's breaker stopped) sends nothing: the process keeps
//! holding the delivery, with the attempt uncounted and the new not-before in memory; if
//! the process dies first, the server delivers it again after `ack_wait`, counted.
//! `dead_letter` publishes to the dead-letter stream, then terminates the delivery
//! (`+TERM`); a delivery whose payload is not an envelope is moved there the same way,
//! as it is, with `Postbox-Reason: undecodable: …` (`dead_letters` skips it). A second
//! copy of a message this process holds (a `retry_later` republish whose ack of the old
//! copy was lost) is not leased twice: the older copy is acked, and the message keeps
//! the later not-before and the higher attempts of the two.
//! [`Depth::in_flight`](super::Depth) counts this process' leases.
//!
//! A process holds at most [`NatsOptions::with_max_held`] deliveries, leased or waiting
//! for their not-before. When that many are held, fewer are due than the lease asks for
//! and the consumer has messages not yet delivered (besides copies moved before), a
//! lease moves up to 16 of the held deliveries due last to the stream's tail (a copy
//! with their not-before and attempts, as `retry_later`, then an ack) and fetches what
//! was behind them: retries scheduled for later never keep a message that is due — for
//! another destination, say — waiting long. While moving brings nothing due (what is
//! behind is other retries not yet due), the next move waits 1 s, doubling up to 30 s,
//! so the hold is not sent round on every poll.
//!
//! `ack`, `retry_later`, `release` and `dead_letter` run to the end on a task of their
//! own even when their future is dropped (a timeout around them), so none leaves a
//! delivery it took out of the hold unsettled until `ack_wait`.
//!
//! # Durability
//!
//! JetStream acknowledges a publish once the message is in the stream's store, **not**
//! once it is fsynced: by default the server syncs its files every 2 minutes
//! (`sync_interval`), so a power loss can lose acknowledged messages. Run the server with
//! `jetstream { sync_interval: always }` (nats-server ≥ 2.10) for fsync before the ack,
//! or use a replicated (R3) stream so an acknowledged message is on a quorum of servers.

use super::hold::{HeldState, MOVED_FOR, RoomPacer, due_last, leasable, settling, waiting};
use super::{
    DeadLetter, Depth, Enqueued, Envelope, LeaseToken, Leased, MessageId, Queue, QueueError,
};
use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{self, AckPolicy, PullConsumer, pull};
use async_nats::jetstream::context::{
    Context, CreateStreamErrorKind, PublishError, PublishErrorKind,
};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::stream::{
    self, ConsumerErrorKind, DiscardPolicy, RetentionPolicy, StorageType,
};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The environment variable that overrides the default URL.
pub const NATS_URL_ENV: &str = "POSTBOX_NATS_URL";
/// The URL used when neither [`NatsOptions::with_url`] nor [`NATS_URL_ENV`] is set.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

const CONSUMER: &str = "postbox";
const H_ID: &str = "Postbox-Id";
const H_KEY: &str = "Postbox-Idempotency-Key";
const H_DEST: &str = "Postbox-Destination";
const H_NOT_BEFORE: &str = "Postbox-Not-Before";
const H_ATTEMPTS: &str = "Postbox-Attempts";
const H_REASON: &str = "Postbox-Reason";
/// The longest `Postbox-Reason` header kept (longer reasons are cut).
const REASON_MAX: usize = 512;
/// Room kept under the server's `max_payload` at enqueue for the headers later
/// publishes of the same message add: a retry's not-before and attempts, a dead letter's
/// reason, message ids.
const HEADROOM: usize = REASON_MAX + 256;

/// Where and how [`NatsQueue::connect`] connects.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    name: String,
    url: Option<String>,
    capacity: Option<u64>,
    ack_wait: Duration,
    duplicate_window: Duration,
    max_held: usize,
    request_timeout: Duration,
}

/// A durable [`Queue`] on NATS JetStream. See the [module docs](self) for the layout,
/// the lease model and durability.
///
/// # Connection loss
///
/// A call made while the server is unreachable fails with [`QueueError::Unavailable`]
/// (after the request timeout, default 5 s); the client reconnects by itself and a
/// later call succeeds once the server is back. An enqueue that failed that way may
/// still have been stored: retrying it is answered [`Enqueued::Duplicate`].
///
/// # Clone
///
/// Clones share the connection and the lease table.
#[derive(Clone)]
pub struct NatsQueue {
    inner: Arc<Inner>,
}

struct Inner {
    js: Context,
    /// Replaced when it was found deleted (see [`Inner::declare_again`]).
    consumer: std::sync::Mutex<PullConsumer>,
    /// What the streams and the consumer were declared with.
    options: NatsOptions,
    stream: String,
    dead_stream: String,
    subject_prefix: String,
    dead_subject: String,
    capacity: Option<u64>,
    /// The consumer's `ack_wait` on the server, in nanoseconds.
    ack_wait_ns: AtomicU64,
    max_held: usize,
    request_timeout: Duration,
    /// The server's `max_payload`, read once at connect (0: unknown).
    max_payload: usize,
    held: Mutex<BTreeMap<MessageId, Held>>,
    /// Leases made so far: every lease's generation (taken under `held`), unique even
    /// when a released delivery's attempts repeat.
    leases: AtomicU64,
    /// Bumped (under `held`) each time the held deliveries are forgotten for a new
    /// consumer: a delivery taken out before then is not put back.
    consumer_epoch: AtomicU64,
    /// Declarations made again by [`declare_again_unlocked`](Inner::declare_again_unlocked)
    /// so far, and the lock that lets one run at a time.
    declarations: AtomicU64,
    declaring: Mutex<()>,
    /// Deliveries [`make_room`](Inner::make_room) moved to the stream's tail and not
    /// fetched back yet, with when: the consumer's undelivered messages include them,
    /// and moving more only to fetch these back would go round for ever.
    moved: std::sync::Mutex<HashMap<MessageId, Instant>>,
    /// Spaces out making room while it brings nothing due.
    pacer: std::sync::Mutex<RoomPacer>,
}

/// A delivery this process holds unacked.
struct Held {
    /// [`Inner::consumer_epoch`] when it was fetched.
    epoch: u64,
    msg: async_nats::jetstream::Message,
    envelope: Envelope,
    state: HeldState,
    /// When the server last heard from us about this delivery (real time).
    touched: Instant,
    /// A copy of it may be on its subject, not yet fetched: a move or retry whose
    /// copy may have been stored failed, or it was leased more than once.
    copied: bool,
    /// Leased here at least once.
    leased: bool,
}

impl Held {
    /// Whether a lease at `now` may take it (see [`leasable`]; a newer copy is taken
    /// over by `fetch`).
    fn due(&self, now: SystemTime) -> bool {
        leasable(self.state, self.envelope.not_before, now)
    }

    /// What it waits for at `now` (see [`waiting`]).
    fn waiting(&self, now: SystemTime) -> HeldState {
        waiting(self.state, self.envelope.not_before, now)
    }

    /// Whether a newer copy of it may be on its subject, one `fetch` has not matched to
    /// it (see [`Inner::settle_copy`]): a move or retry of it failed after its copy may
    /// have been stored, it was leased again here after a lease that ended unsettled,
    /// or the server delivered it more than once (another process's lease may have
    /// left a copy).
    fn may_have_copy(&self) -> bool {
        self.copied || self.msg.info().is_ok_and(|i| i.delivered > 1)
    }
}

// === impl NatsOptions ===

impl NatsOptions {
    /// Options for the queue `name` (letters, digits, `-` and `_`, not ending in `_DEAD`;
    /// it names the streams), at the URL from `POSTBOX_NATS_URL` or else
    /// `nats://127.0.0.1:4222`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            url: None,
            capacity: None,
            ack_wait: Duration::from_secs(30),
            duplicate_window: Duration::from_secs(120),
            max_held: 10_000,
            request_timeout: Duration::from_secs(5),
        }
    }

    /// Connects to `url` (`nats://[user:password@]host:port`, or `nats://token@host:port`;
    /// `%XX` escapes are decoded: write a `%` as `%25`, a `,` as `%2C`) instead; several
    /// servers of a cluster as a comma-separated list (`nats://u:p@a:4222,nats://b`:
    /// the first credentials given are used for all), tried in a random order on each
    /// connect. The servers a cluster announces are not used (only the addresses given
    /// are ever dialled).
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Holds at most `capacity` live messages (the stream's `max_msgs` with
    /// `discard: new`); beyond that `enqueue` fails with [`QueueError::Full`].
    /// [`connect`](NatsQueue::connect) refuses a capacity below the number of messages
    /// the stream already holds (the server would delete the oldest to fit), and a
    /// capacity of 0 (JetStream would read it as no limit). On a full
    /// queue, `retry_later` keeps holding the delivery, scheduled, as there is no room
    /// for its republished copy. A process connected without a capacity leaves the
    /// stream's limit as it is (its enqueues into a full stream fail as
    /// [`QueueError::Backend`]): raise or remove a limit by connecting with the new
    /// capacity, or on the stream itself.
    pub fn with_capacity(mut self, capacity: u64) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// The consumer's `ack_wait`: how long after this process dies its held messages
    /// come back (default 30 s).
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// The `duplicate_window` of both streams (the work stream's and the dead letters')
    /// for `Nats-Msg-Id`, which the copies `retry_later` and `dead_letter` publish and a
    /// keyless enqueue carry, so such a publish retried
    /// after a lost reply is stored once (default 2 min). A keyed enqueue de-duplicates
    /// by subject, with no window.
    pub fn with_duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// How many deliveries this process holds at most (default 10 000; each process
    /// bounds its own: the consumer's `max_ack_pending` is unlimited). Each is kept in
    /// memory with its body while
    /// held (put back for a later time, waiting for its destination to recover): at
    /// most `max` × the largest body (10 000 × 100 KiB is a GiB). Lower it for large
    /// bodies.
    pub fn with_max_held(mut self, max: usize) -> Self {
        self.max_held = max.max(1);
        self
    }

    /// How long to wait for the server before a call fails with
    /// [`QueueError::Unavailable`] (default 5 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The URL that will be used.
    pub fn url(&self) -> String {
        super::broker_url(self.url.as_deref(), NATS_URL_ENV, DEFAULT_NATS_URL)
    }
}

// === impl NatsQueue ===

impl NatsQueue {
    /// Connects, creates the two streams and the consumer if missing (or sets postbox's
    /// fields on the work stream's config, the dead-letter stream's window and the
    /// consumer's), and spawns the
    /// task that keeps held deliveries alive (module docs), so call it inside a Tokio
    /// runtime.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] if the server cannot be reached,
    /// [`QueueError::Backend`] for an invalid name or URL, when the server refuses the
    /// URL's credentials, if JetStream refuses the configuration (for example an existing stream of that name with another
    /// retention), or when polled outside a Tokio runtime.
    pub async fn connect(options: NatsOptions) -> Result<Self, QueueError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            QueueError::Backend(format!("NatsQueue::connect needs a Tokio runtime: {e}").into())
        })?;
        let name = &options.name;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(QueueError::Backend(
                format!("invalid queue name {name:?}: use letters, digits, '-' and '_'").into(),
            ));
        }
        if name.ends_with("_DEAD") {
            // `POSTBOX_{name}` would be the dead-letter stream of the queue named
            // without the suffix.
            return Err(QueueError::Backend(
                format!(
                    "invalid queue name {name:?}: a name ending in `_DEAD` names another \
                     queue's dead-letter stream"
                )
                .into(),
            ));
        }
        if options.capacity == Some(0) {
            // JetStream reads a `max_msgs` of 0 as "no limit".
            return Err(QueueError::Backend(
                format!(
                    "nats queue {name}: a capacity of 0 holds no message (the server would \
                     take it for no limit); give at least 1, or no capacity"
                )
                .into(),
            ));
        }
        let url = options.url();
        // Parsed first: a bad URL is no outage to wait out (it would fail every call).
        // A comma separates servers (one in a password is written `%2C`).
        let mut servers = url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                QueueError::Backend(format!("nats queue {name}: invalid URL: {e}").into())
            })?;
        let mut connect = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(options.request_timeout))
            .ignore_discovered_servers();
        // The client reads no credentials from a URL: they are passed on (the first
        // given, for every server of the list), and taken out of the addresses (which
        // the client logs).
        if let Some(with) = servers.iter().find(|s| s.has_user_pass()) {
            let user = crate::queue::envelope::percent_decoded(with.username().unwrap_or_default());
            connect = match with.password() {
                Some(pass) => {
                    connect.user_and_password(user, crate::queue::envelope::percent_decoded(pass))
                }
                None => connect.token(user),
            };
            for server in &mut servers {
                let mut bare = server.clone().into_inner();
                let _ = bare.set_password(None);
                let _ = bare.set_username("");
                if let Ok(bare) = async_nats::ServerAddr::from_url(bare) {
                    *server = bare;
                }
            }
        }
        let client = connect.connect(servers).await.map_err(|e| {
            // Its credentials left out, server by server: the error is logged.
            let at = url
                .split(',')
                .map(|u| format!("{:?}", crate::queue::envelope::RedactedUri(u.trim())))
                .collect::<Vec<_>>()
                .join(",");
            let what = format!("nats at {at}: {e}");
            // Refused credentials are a configuration error, not an outage.
            if matches!(
                e.kind(),
                async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication
            ) {
                QueueError::Backend(what.into())
            } else {
                QueueError::Unavailable(what.into())
            }
        })?;
        let js = async_nats::jetstream::context::ContextBuilder::new()
            .timeout(options.request_timeout)
            .build(client);
        let names = Names::of(name);
        let consumer = declare(&js, &options, &names).await?;
        let ack_wait = consumer.cached_info().config.ack_wait;
        let Names {
            stream,
            dead_stream,
            subject_prefix,
            dead_subject,
        } = names;
        let max_payload = js.client().server_info().max_payload;
        let inner = Arc::new(Inner {
            max_payload,
            js,
            consumer: std::sync::Mutex::new(consumer),
            options: options.clone(),
            stream,
            dead_stream,
            subject_prefix,
            dead_subject,
            capacity: options.capacity,
            ack_wait_ns: AtomicU64::new(u64::try_from(ack_wait.as_nanos()).unwrap_or(u64::MAX)),
            max_held: options.max_held,
            request_timeout: options.request_timeout,
            held: Mutex::new(BTreeMap::new()),
            moved: std::sync::Mutex::default(),
            pacer: std::sync::Mutex::default(),
            leases: AtomicU64::new(0),
            consumer_epoch: AtomicU64::new(0),
            declarations: AtomicU64::new(0),
            declaring: Mutex::new(()),
        });
        runtime.spawn(keep_held_alive(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// The JetStream context, for requests of your own.
    pub fn jetstream(&self) -> &Context {
        &self.inner.js
    }

    /// The names of the message stream and the dead-letter stream.
    pub fn streams(&self) -> (&str, &str) {
        (&self.inner.stream, &self.inner.dead_stream)
    }

    /// Deletes both streams (all messages and dead letters) and forgets this process'
    /// leases.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] or [`QueueError::Backend`].
    pub async fn purge(&self) -> Result<(), QueueError> {
        // The hold locked throughout: a lease meanwhile would fetch from the streams
        // being deleted, and a settle failing on them would put its delivery back.
        // Forgotten with the consumer's epoch, so a put back still in flight is dropped.
        let mut held = self.inner.held.lock().await;
        let deleted = async {
            for s in [&self.inner.stream, &self.inner.dead_stream] {
                self.inner
                    .js
                    .delete_stream(s)
                    .await
                    .map_err(|e| classify(e, "delete stream"))?;
            }
            Ok(())
        }
        .await;
        self.inner.forget_held(&mut held);
        deleted
    }
}

impl Inner {
    fn subject(&self, envelope: &Envelope) -> String {
        let key = envelope.idempotency_key.as_bytes();
        let mut s = self.subject_prefix.clone();
        if key.is_empty() {
            s.push_str("id-");
            s.push_str(&envelope.id.to_string());
        } else if key.len() > 100 {
            s.push('s');
            push_hex(
                &mut s,
                ring::digest::digest(&ring::digest::SHA256, key).as_ref(),
            );
        } else {
            s.push('x');
            push_hex(&mut s, key);
        }
        s
    }

    async fn enqueue(&self, envelope: Envelope) -> Result<Enqueued, QueueError> {
        envelope.check_encodable()?;
        let subject = async_nats::Subject::from(self.subject(&envelope));
        let payload = Bytes::from(envelope.encode());
        self.fits(payload.len() + header_room(&envelope))?;
        // Built per attempt rather than cloned: the first attempt is nearly always the last.
        // A keyed message has no `Nats-Msg-Id`: its subject's expected sequence refuses a
        // second copy while one is in the stream, a receiver's idempotency layer absorbs a
        // copy retried after that, and the server's window of message ids cost 10–40 % of
        // the enqueue's throughput (`raw/nats/64_producers_same_message*`). A keyless one
        // keeps it: nothing downstream would catch its retried copy.
        let id = envelope
            .idempotency_key
            .is_empty()
            .then(|| envelope.id.to_string());
        let publish = || {
            let mut h = headers(&envelope);
            h.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
            if let Some(id) = &id {
                h.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            }
            Publish::build().payload(payload.clone()).headers(h)
        };
        let mut last = None;
        for _ in 0..3 {
            let declarations = self.declarations.load(Ordering::Acquire);
            let result = self.publish(subject.clone(), publish()).await;
            match result {
                Ok(ack) if ack.duplicate => return Ok(Enqueued::Duplicate(envelope.id)),
                Ok(_) => return Ok(Enqueued::Stored(envelope.id)),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    let stream = self.js.get_stream_no_info(&self.stream).await;
                    let stream = stream.map_err(|e| classify(e, "get stream"))?;
                    match stream.get_last_raw_message_by_subject(&subject).await {
                        Ok(m) => {
                            // Written by another producer without the header: its id
                            // is in its envelope.
                            let id = id_of(&m.headers, &m.payload).ok_or_else(|| {
                                QueueError::Corrupt(format!(
                                    "message {} on {subject} has no {H_ID} and is not an envelope",
                                    m.sequence
                                ))
                            })?;
                            return Ok(Enqueued::Duplicate(id));
                        }
                        // Acked in between: the key is free again, publish once more.
                        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                        Err(e) => return Err(classify(e, "look up duplicate")),
                    }
                }
                // Ours only with a capacity; otherwise a limit set on the stream by hand
                // (`max_bytes`, say), a backend error.
                Err(e) if is_full(&e) && self.capacity.is_some() => {
                    return Err(QueueError::Full {
                        capacity: self.capacity.unwrap_or(0),
                    });
                }
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    // Deleted by hand: declared again (once for every producer that
                    // met it), then published once more.
                    self.declare_again_unlocked(false, Some(declarations)).await;
                    last = Some(e);
                }
                Err(e) => return Err(classify(e, "publish")),
            }
        }
        match last {
            Some(e) => Err(classify(e, "publish")),
            None => Err(QueueError::Backend(
                format!("subject {subject} kept changing while enqueueing").into(),
            )),
        }
    }

    /// Refuses a message the server would not take: one larger than its `max_payload`
    /// (headers included) makes the server close the connection, failing every call on
    /// it, and the message would never be stored. `size` counts payload and headers;
    /// [`HEADROOM`] is kept for the headers a retry or a dead letter adds.
    fn fits(&self, size: usize) -> Result<(), QueueError> {
        let max = self.max_payload;
        if max > 0 && size + HEADROOM > max {
            return Err(QueueError::Backend(
                format!(
                    "nats: a message of {size} bytes with its headers (and {HEADROOM} kept \
                     for a retry's) is larger than the server's max_payload of {max} bytes"
                )
                .into(),
            ));
        }
        Ok(())
    }

    /// Declares the streams and the consumer again (deleted by hand, say), so the next
    /// call works. With `check`, only if the consumer or its stream is found missing
    /// (after a failed fetch, which a server that is down fails too).
    ///
    /// `true` if the consumer is a new one: the caller must then forget every held
    /// delivery (with `held` locked, so this never locks it). Their acks would reach the
    /// new consumer, which knows the stream sequences of other messages (a new stream
    /// starts again at 1): an old lease's ack would ack another message.
    async fn declare_again(&self, check: bool, held: &BTreeMap<MessageId, Held>) -> bool {
        if check {
            // A server that is down fails the fetch too: nothing to look up then.
            let state = self.js.client().connection_state();
            if state != async_nats::connection::State::Connected {
                return false;
            }
            let found = self
                .js
                .get_consumer_from_stream::<pull::Config, _, _>(CONSUMER, &self.stream)
                .await;
            let missing = match &found {
                Err(e) => matches!(e.kind(), ConsumerErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND
                        || j.error_code() == ErrorCode::STREAM_NOT_FOUND),
                Ok(_) => false,
            };
            if !missing {
                return false;
            }
        }
        match declare(&self.js, &self.options, &Names::of(&self.options.name)).await {
            Ok(consumer) => {
                tracing::warn!(stream = %self.stream, "postbox: nats streams or consumer were missing; declared again");
                let mut current = self.consumer.lock().unwrap_or_else(|e| e.into_inner());
                let new = !same_consumer(current.cached_info(), consumer.cached_info(), held);
                self.set_ack_wait(consumer.cached_info().config.ack_wait);
                *current = consumer;
                new
            }
            Err(e) => {
                tracing::warn!(stream = %self.stream, error = %e, "postbox: could not declare the nats streams and consumer again");
                false
            }
        }
    }

    /// [`declare_again`](Self::declare_again), forgetting the held deliveries if the
    /// consumer is new (`held` must not be locked by the caller). `held` is locked
    /// throughout, so no `lease` hands out an old delivery, or fetches a new one that
    /// is then forgotten, between the swap of the consumer and the clearing.
    ///
    /// One at a time, and not at all if another was made since `seen` (read from
    /// [`declarations`](Self::declarations) before the call that found the stream
    /// missing): producers that all met a deleted stream wait for one declaration
    /// instead of each making its own, three or four requests each, one after another,
    /// holding the lock every lease and settle needs.
    async fn declare_again_unlocked(&self, check: bool, seen: Option<u64>) {
        let _one = self.declaring.lock().await;
        if seen.is_some_and(|seen| self.declarations.load(Ordering::Acquire) != seen) {
            return;
        }
        let mut held = self.held.lock().await;
        if self.declare_again(check, &held).await {
            self.forget_held(&mut held);
        }
        self.declarations.fetch_add(1, Ordering::Release);
    }

    /// Forgets every held delivery: they belong to a consumer that is gone (see
    /// [`declare_again`](Self::declare_again)). Called with `held` locked; deliveries
    /// taken out meanwhile (a settle in progress) are not put back.
    fn forget_held(&self, held: &mut BTreeMap<MessageId, Held>) {
        held.clear();
        // The consumer (or the stream) is new: what was moved before counts for nothing.
        self.lock_moved().clear();
        self.consumer_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// The error for a failed publish of a leased message: one to a stream that is gone
    /// declares the streams again (unless another call did since `seen`, read before the
    /// publish) and is [`QueueError::Unavailable`], as a new try works.
    async fn publish_failed(&self, e: PublishError, what: &str, seen: u64) -> QueueError {
        if e.kind() == PublishErrorKind::StreamNotFound {
            self.declare_again_unlocked(false, Some(seen)).await;
            return QueueError::Unavailable(format!("nats {what}: {e}; declared again").into());
        }
        classify(e, what)
    }

    /// Publishes and waits for the stream's ack.
    async fn publish(
        &self,
        subject: impl async_nats::subject::ToSubject,
        publish: Publish,
    ) -> Result<async_nats::jetstream::publish::PublishAck, PublishError> {
        self.js.send_publish(subject, publish).await?.await
    }

    /// Pulls up to `n` new deliveries into `held`. `Ok(true)` when the server gave all
    /// that was asked for, so more may be waiting.
    async fn fetch(
        &self,
        held: &mut BTreeMap<MessageId, Held>,
        n: usize,
    ) -> Result<bool, QueueError> {
        let n = n.min(self.max_held.saturating_sub(held.len()));
        if n == 0 {
            return Ok(false);
        }
        // Disconnected, a pull request would only wait in the client's queue (while
        // `held` is locked: a full queue waits for the reconnect), then go out to an
        // inbox given up by then, its messages invisible until `ack_wait` passes.
        if self.js.client().connection_state() != async_nats::connection::State::Connected {
            return Err(QueueError::Unavailable(
                "nats fetch: not connected to the server".into(),
            ));
        }
        let consumer = self
            .consumer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let asked = consumer.fetch().max_messages(n).messages();
        let mut batch = tokio::time::timeout(self.request_timeout, asked)
            .await
            .map_err(|_| QueueError::Unavailable("nats fetch: no room to ask in time".into()))?
            .map_err(|e| classify(e, "fetch"))?;
        let mut got = 0;
        loop {
            let next = tokio::time::timeout(self.request_timeout, batch.next()).await;
            let Some(msg) =
                next.map_err(|_| QueueError::Unavailable("nats fetch: no answer in time".into()))?
            else {
                break;
            };
            let mut msg = msg.map_err(|e| classify_dyn(&*e, "fetch"))?;
            got += 1;
            let delivered = msg
                .info()
                .map(|i| u32::try_from(i.delivered).unwrap_or(1))
                .unwrap_or(1);
            let mut envelope = match Envelope::decode(&msg.payload) {
                Ok(e) => e,
                Err(e) => {
                    self.set_aside(msg, &e.to_string()).await;
                    continue;
                }
            };
            // The envelope holds its own copy of everything: a held delivery keeps only
            // what its acks need, not the payload a second time.
            msg.message.payload = Bytes::new();
            let h = msg.headers.as_ref();
            let header = |name: &str| h.and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
            if let Some(a) = header(H_ATTEMPTS).and_then(|a| a.parse::<u32>().ok()) {
                envelope.attempts = a;
            }
            // Each earlier delivery of this copy was held by a process that died.
            envelope.attempts = envelope
                .attempts
                .saturating_add(delivered.saturating_sub(1));
            if let Some(nb) = header(H_NOT_BEFORE).and_then(|v| v.parse::<u64>().ok())
                && ms_ceil(envelope.not_before) != nb
            {
                envelope.not_before =
                    super::saturating_add(SystemTime::UNIX_EPOCH, Duration::from_millis(nb));
            }
            let id = envelope.id;
            self.fetched_back(id);
            match held.get_mut(&id) {
                // Delivered again while we held it (ack_wait passed): keep our state.
                Some(h) if sequence(&h.msg) == sequence(&msg) => {
                    h.msg = msg;
                    h.touched = Instant::now();
                }
                // Another copy of a message we hold (left by a `retry_later` whose
                // republish was stored but whose ack of the old copy was lost): keep our
                // state on the newer copy, and take the older one out of the stream. The
                // message keeps the later not-before and the higher attempts of the two
                // (the newer copy is not always the later state: a move's copy may come
                // after the held one was leased or retried): a lease in progress goes
                // on, but once it ends the message waits for that not-before (it was
                // leased again at once, a retry's delay lost).
                Some(h) => {
                    let older = if sequence(&msg) > sequence(&h.msg) {
                        h.touched = Instant::now();
                        if envelope.not_before > h.envelope.not_before {
                            h.envelope.not_before = envelope.not_before;
                            if let HeldState::Scheduled(_) = h.state {
                                h.state = HeldState::Scheduled(envelope.not_before);
                            }
                        }
                        h.envelope.attempts = h.envelope.attempts.max(envelope.attempts);
                        std::mem::replace(&mut h.msg, msg)
                    } else {
                        msg
                    };
                    tracing::warn!(subject = %older.subject, %id, "postbox: older copy of a held message acked");
                    if let Err(e) = self.confirm_ack(&older, AckKind::Ack).await {
                        tracing::warn!(%id, error = %e, "postbox: could not ack an older copy");
                    }
                }
                None => {
                    let state = HeldState::Scheduled(envelope.not_before);
                    held.insert(
                        id,
                        Held {
                            epoch: self.consumer_epoch.load(Ordering::Relaxed),
                            msg,
                            envelope,
                            state,
                            touched: Instant::now(),
                            copied: false,
                            leased: false,
                        },
                    );
                }
            }
        }
        Ok(got >= n)
    }

    /// Moves a delivery whose envelope cannot be decoded to the dead-letter stream, as it
    /// is (payload and headers but JetStream's `Nats-*`, plus `Postbox-Reason:
    /// undecodable: …`), and only then takes it out of the work queue; logged at error
    /// level and counted in `postbox_queue_quarantined_total`. If the move fails, the
    /// delivery is given back for a later fetch to try again.
    async fn set_aside(&self, msg: async_nats::jetstream::Message, why: &str) {
        // JetStream's own headers stay out: the server keeps them with the message, and
        // a copied `Nats-Expected-Last-Subject-Sequence: 0` (our enqueue's) is only met
        // while the dead stream is empty, a copied `Nats-Msg-Id` may be a duplicate.
        let mut headers = HeaderMap::new();
        for (name, values) in msg.headers.iter().flat_map(HeaderMap::iter) {
            let text: &str = name.as_ref();
            if text
                .get(..5)
                .is_some_and(|p| p.eq_ignore_ascii_case("nats-"))
            {
                continue;
            }
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
        let reason = format!("undecodable: {why}");
        let id = format!("{}.seq{}.dead", self.stream, sequence(&msg));
        let Some(headers) =
            dead_headers(headers, &reason, &id, msg.payload.len(), self.max_payload)
        else {
            // Stored under a larger max_payload than the server has now: no copy of it
            // can be published. Left in the work stream, never decoded.
            tracing::error!(subject = %msg.subject, size = msg.payload.len(), max_payload = self.max_payload, "postbox: an undecodable message is larger than the server's max_payload and cannot be dead-lettered");
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(self.ack_wait()))).await {
                tracing::warn!(error = %e, "postbox: could not settle an undecodable message");
            }
            return;
        };
        let publish = Publish::build()
            .payload(msg.payload.clone())
            .headers(headers);
        let moved = self.publish(self.dead_subject.clone(), publish).await;
        let answer = match moved {
            Ok(_) => {
                // Counted (and logged at error level) once moved: a move that failed
                // comes back with a later fetch, and would be counted again.
                tracing::error!(subject = %msg.subject, reason = why, "postbox: undecodable message moved to the dead-letter stream");
                metrics::counter!("postbox_queue_quarantined_total").increment(1);
                self.confirm_ack(&msg, AckKind::Term).await
            }
            Err(e) => {
                tracing::warn!(subject = %msg.subject, reason = why, error = %e, "postbox: could not dead-letter an undecodable message");
                msg.ack_with(AckKind::Nak(Some(self.ack_wait()))).await
            }
        };
        if let Err(e) = answer {
            tracing::warn!(error = %e, "postbox: could not settle an undecodable message");
        }
    }

    async fn lease(
        &self,
        max: usize,
        lease_for: Duration,
        now: SystemTime,
    ) -> Result<Vec<Leased>, QueueError> {
        let mut held = self.held.lock().await;
        if max == 0 {
            return Ok(Vec::new());
        }
        // What is held and due needs no server; fetch only for the rest. A failed fetch
        // fails the lease only if nothing held is due (a limit of unacked deliveries set
        // on the consumer by hand, full of other processes', gives a fetch nothing; the
        // next declare sets none again).
        let started = Instant::now();
        let due = held.values().filter(|h| h.due(now)).count();
        let mut moved = 0;
        if held.len() < self.max_held {
            // Not full: a later outage's first move starts from the shortest pause.
            self.lock_pacer().calm();
        } else if due < max && self.lock_pacer().may() {
            moved = self.make_room(&mut held, max - due, now).await;
        }
        // Fetched deliveries not due yet (retries a process that stopped left for
        // later) are held, and the fetch goes on for what is behind them while the
        // server has more, the hold has room, and for at most a quarter of `ack_wait`
        // (the keep-alive waits for `held`). Each round that brought too few due asks
        // for twice as many, up to `FETCH_AHEAD`: passing many later deliveries a few
        // at a time would keep `held` locked for a round trip each, and asking for many
        // at once would hold here due ones another process could take.
        const FETCH_AHEAD: usize = 64;
        let mut due_now = due;
        let mut ask = max.saturating_sub(due);
        while due_now < max {
            match self.fetch(&mut held, ask).await {
                Ok(more) => {
                    due_now = held.values().filter(|h| h.due(now)).count();
                    ask = max
                        .saturating_sub(due_now)
                        .max(ask.saturating_mul(2).min(FETCH_AHEAD));
                    if !more || started.elapsed() >= self.ack_wait() / 4 {
                        break;
                    }
                }
                Err(e) => {
                    if self.declare_again(true, &held).await {
                        self.forget_held(&mut held);
                        // Producers that met the same missing stream need not declare it
                        // again.
                        self.declarations.fetch_add(1, Ordering::Release);
                    }
                    if !held.values().any(|h| h.due(now)) {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "postbox: nats fetch failed; leasing what is held");
                    break;
                }
            }
        }
        if moved > 0 {
            self.lock_pacer().made(due_now > due);
        }
        let lease_until = super::saturating_add(now, lease_for);
        let mut out = Vec::new();
        for (&id, h) in held.iter_mut() {
            if out.len() >= max {
                break;
            }
            if !h.due(now) {
                continue;
            }
            h.envelope.attempts = h.envelope.attempts.saturating_add(1);
            let generation = self.leases.fetch_add(1, Ordering::Relaxed) + 1;
            // Leased here before, and not settled: that lease's retry may have left a
            // copy (a reply lost, then given up on).
            h.copied |= h.leased;
            h.leased = true;
            h.state = HeldState::Leased(lease_until, generation);
            out.push(Leased {
                envelope: h.envelope.clone(),
                token: LeaseToken { id, generation },
                lease_until,
            });
        }
        Ok(out)
    }

    /// Tells the server we still hold the deliveries it has not heard about for a
    /// quarter of `ack_wait`. Sent without holding `held`: while the client reconnects,
    /// a publish can wait for room in its command queue, and `lease`, `ack` and the
    /// rest must not wait with it. Nothing is sent while disconnected (it would not
    /// arrive, and the deliveries stay due for the next tick).
    async fn keep_alive(&self) {
        if self.js.client().connection_state() != async_nats::connection::State::Connected {
            return;
        }
        let Some(stale) = Instant::now().checked_sub(self.ack_wait() / 4) else {
            return;
        };
        let due: Vec<_> = self
            .held
            .lock()
            .await
            .iter()
            .filter(|(_, h)| h.touched <= stale)
            .filter_map(|(&id, h)| Some((id, h.msg.reply.clone()?)))
            .collect();
        let mut sent = Vec::with_capacity(due.len());
        for (id, reply) in due {
            let progress = Bytes::from(AckKind::Progress);
            if self.js.client().publish(reply, progress).await.is_ok() {
                sent.push(id);
            }
        }
        if sent.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut held = self.held.lock().await;
        for id in sent {
            if let Some(h) = held.get_mut(&id) {
                h.touched = now;
            }
        }
    }

    /// Acknowledges `msg` (`kind`: an ack, a `+TERM`) and waits for the server to
    /// confirm it. An answer that says nobody listens (a consumer deleted by hand, a
    /// replicated consumer without a leader) is an error: async-nats's `double_ack`
    /// took any answer, that one too, for a confirmation, so an ack the server never
    /// applied was reported done and the message replayed again.
    async fn confirm_ack(
        &self,
        msg: &async_nats::jetstream::Message,
        kind: AckKind,
    ) -> Result<(), async_nats::Error> {
        let Some(reply) = msg.reply.clone() else {
            return Err("no reply subject: not a JetStream message".into());
        };
        let payload: Bytes = kind.into();
        self.js.client().request(reply, payload).await?;
        Ok(())
    }

    /// The consumer's `ack_wait` on the server, as last read (see
    /// [`refresh_consumer`](Self::refresh_consumer)).
    fn ack_wait(&self) -> Duration {
        Duration::from_nanos(self.ack_wait_ns.load(Ordering::Relaxed))
    }

    /// Reads the consumer from the server (waiting at most `within`): its `ack_wait`,
    /// which a process that declared the consumer later with another one changed for
    /// every process; and its creation time. The same consumer restored by a restarted
    /// server keeps the held deliveries (see [`same_consumer`]). A consumer created anew
    /// (by another process, after the stream or consumer was deleted by hand) is not this process'
    /// any more: its held deliveries are forgotten, as in
    /// [`declare_again`](Self::declare_again), since their acks would reach the new
    /// consumer and ack other messages with the same stream sequences.
    async fn refresh_consumer(&self, within: Duration) {
        let mut consumer = self
            .consumer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let known = consumer.cached_info().clone();
        let read = tokio::time::timeout(within, consumer.info()).await;
        let Ok(Ok(info)) = read else { return };
        self.set_ack_wait(info.config.ack_wait);
        if info.created == known.created {
            return;
        }
        let mut held = self.held.lock().await;
        let same = same_consumer(&known, consumer.cached_info(), &held);
        let mut current = self.consumer.lock().unwrap_or_else(|e| e.into_inner());
        if current.cached_info().created == known.created {
            *current = consumer;
            drop(current);
            if same {
                tracing::debug!(stream = %self.stream, "postbox: nats consumer restored by a restarted server; held deliveries kept");
            } else {
                tracing::warn!(stream = %self.stream, "postbox: nats consumer was created anew; held deliveries forgotten");
                self.forget_held(&mut held);
            }
        }
    }

    fn set_ack_wait(&self, ack_wait: Duration) {
        let ns = u64::try_from(ack_wait.as_nanos()).unwrap_or(u64::MAX);
        self.ack_wait_ns.store(ns, Ordering::Relaxed);
    }

    /// Removes and returns the delivery of `token` if its lease is current.
    fn take(held: &mut BTreeMap<MessageId, Held>, token: LeaseToken) -> Result<Held, QueueError> {
        match held.get(&token.id) {
            Some(h) if matches!(h.state, HeldState::Leased(_, g) if g == token.generation) => {
                Ok(held.remove(&token.id).expect("present"))
            }
            _ => Err(QueueError::LeaseLost(token)),
        }
    }

    async fn ack(&self, tokens: &[LeaseToken]) -> Result<(), QueueError> {
        let mut lost = None;
        let mut taken = Vec::with_capacity(tokens.len());
        {
            let mut held = self.held.lock().await;
            for &t in tokens {
                match Self::take(&mut held, t) {
                    Ok(h) => taken.push(h),
                    Err(e) => {
                        lost.get_or_insert(e);
                    }
                }
            }
        }
        let results = futures_util::future::join_all(
            taken.iter().map(|h| self.confirm_ack(&h.msg, AckKind::Ack)),
        )
        .await;
        let mut failed = None;
        let mut unacked = Vec::new();
        for (r, h) in results.into_iter().zip(taken) {
            match r {
                Err(e) => {
                    failed.get_or_insert_with(|| classify_dyn(&*e, "ack"));
                    unacked.push(h);
                }
                Ok(()) => self.settle_copy(&h).await,
            }
        }
        if let Some(e) = failed {
            self.put_back(unacked).await;
            return Err(e);
        }
        lost.map_or(Ok(()), Err)
    }

    /// Holds again, as they were, deliveries taken out to be settled whose settling the
    /// server did not confirm: the call fails (`Unavailable`, say) and the caller may
    /// repeat it with the same token, instead of finding the lease lost and the message
    /// replayed once `ack_wait` passes. Repeating is safe: the copies a retry or a dead
    /// letter publishes are de-duplicated by message id, and an ack the server applied
    /// after all is answered again. A caller that does not repeat before the lease ends
    /// gets the message leased again (the replayer repeats every poll interval while the
    /// lease lasts). A delivery fetched again meanwhile is not replaced. (A repeat made
    /// while the first call still runs, on its own task, finds the lease taken:
    /// `LeaseLost`.)
    async fn put_back(&self, deliveries: Vec<Held>) {
        if deliveries.is_empty() {
            return;
        }
        let mut held = self.held.lock().await;
        let epoch = self.consumer_epoch.load(Ordering::Relaxed);
        for h in deliveries.into_iter().filter(|h| h.epoch == epoch) {
            held.entry(h.envelope.id).or_insert(h);
        }
    }

    async fn retry_later(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> Result<(), QueueError> {
        // Taken out under the lock, then published without it: a republish waiting on
        // the server must not hold up the process's other leases and settles.
        let h = Self::take(&mut *self.held.lock().await, token)?;
        let mut envelope = h.envelope.clone();
        envelope.not_before = not_before;
        let declarations = self.declarations.load(Ordering::Acquire);
        // A copy an earlier lease's retry left (its reply lost, then given up on): the
        // retry goes after it, which is then deleted; else it would be leased later
        // with that retry's not-before and attempts, and this retry dropped as its
        // duplicate.
        let mut last = sequence(&h.msg);
        if h.may_have_copy()
            && let Some(seq) = self.newer_copy(&h).await
        {
            last = seq;
        }
        let mut copied = self.publish_copy(&h, &envelope, "r", last).await;
        if let Err(e) = &copied
            && e.kind() == PublishErrorKind::WrongLastSequence
        {
            // The subject's last message may be a newer copy of this very message, not
            // yet delivered: one stored by an earlier move or retry of this delivery
            // whose ack was lost. The retry is still ours: its copy goes after that one,
            // which is then deleted, so one copy is left. Anything else on the subject
            // means the message was settled elsewhere.
            match self.newer_copy(&h).await {
                Some(seq) => {
                    last = seq;
                    copied = self.publish_copy(&h, &envelope, "r", seq).await;
                }
                None => return Err(QueueError::LeaseLost(token)),
            }
        }
        // Published after a newer copy, which it supersedes; a duplicate stored nothing
        // new: the copy at `last` is the one kept.
        let superseded = (last != sequence(&h.msg)
            && copied.as_ref().is_ok_and(|ack| !ack.duplicate))
        .then_some(last);
        if let Err(e) = copied {
            if e.kind() == PublishErrorKind::WrongLastSequence {
                return Err(QueueError::LeaseLost(token));
            }
            if is_full(&e) {
                // No room for the copy beside the original (a full queue is when retries
                // pile up): keep holding the original instead, scheduled, this attempt
                // counted. Only a crash loses the new not-before (it is due at once).
                let mut h = h;
                h.envelope.not_before = not_before;
                h.state = HeldState::Scheduled(not_before);
                h.leased = false; // settled here, with nothing stored
                self.put_back(vec![h]).await;
                return Ok(());
            }
            // Still leased: the caller may try again. The copy may have been stored
            // (its reply lost).
            let mut h = h;
            h.copied = true;
            self.put_back(vec![h]).await;
            return Err(self
                .publish_failed(e, "republish for retry", declarations)
                .await);
        }
        if let Some(seq) = superseded {
            self.delete_copy(seq).await;
        }
        // If this ack is lost the original comes back too: at least once, as always.
        if let Err(e) = self.confirm_ack(&h.msg, AckKind::Ack).await {
            let e = classify_dyn(&*e, "ack after retry");
            let mut h = h;
            h.copied = true; // stored, behind it
            self.put_back(vec![h]).await;
            return Err(e);
        }
        Ok(())
    }

    /// After `h` was acked or dead-lettered: a newer copy of it on its subject (see
    /// [`Held::may_have_copy`]) is deleted, or it would be replayed later, and keep its
    /// key taken (every enqueue of the key answered `Duplicate` of a settled message).
    async fn settle_copy(&self, h: &Held) {
        if h.may_have_copy()
            && let Some(seq) = self.newer_copy(h).await
        {
            tracing::warn!(id = %h.envelope.id, seq, "postbox: a copy left by an earlier retry or move deleted with the message");
            self.delete_copy(seq).await;
        }
    }

    /// Publishes `envelope` as the next copy of the held delivery `h` on its subject
    /// (its `retry_later`, or a move to the stream's tail): stored only while `h` is
    /// still the subject's last message. If it was redelivered and settled elsewhere
    /// (this process stalled past `ack_wait`) and a new message took the key, the
    /// publish fails with `WrongLastSequence`, and no second live message with the key
    /// is stored.
    ///
    /// `last` is the sequence expected last on the subject: `h`'s own, or that of a
    /// newer copy of it ([`newer_copy`](Self::newer_copy)).
    async fn publish_copy(
        &self,
        h: &Held,
        envelope: &Envelope,
        kind: &str,
        last: u64,
    ) -> Result<async_nats::jetstream::publish::PublishAck, PublishError> {
        let mut headers = headers(envelope);
        headers.insert(
            H_NOT_BEFORE,
            ms_ceil(envelope.not_before).to_string().as_str(),
        );
        let seq = last;
        if seq > 0 {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                seq.to_string().as_str(),
            );
        }
        let publish = Publish::build()
            .payload(Bytes::from(envelope.encode()))
            .headers(headers)
            // Named after the delivered copy's stream sequence, not the attempts: when
            // this publish is stored but its reply is lost, the next copy of the same
            // delivery (whatever its attempts by then) is dropped by the server as a
            // duplicate instead of storing a second live copy.
            // After a newer copy (`last`, not the delivery's own sequence), named after
            // both: that copy may be this delivery's earlier one, under the same name.
            .message_id(match h.msg.info() {
                Ok(info) if info.stream_sequence == last => {
                    format!("{}.{kind}{}", envelope.id, info.stream_sequence)
                }
                Ok(info) => format!("{}.{kind}{}.{last}", envelope.id, info.stream_sequence),
                Err(_) => format!("{}.{kind}.{}", envelope.id, envelope.attempts),
            });
        self.publish(h.msg.subject.clone(), publish).await
    }

    /// The stream sequence of the last message on `h`'s subject if it is a newer copy
    /// of `h`'s message (same id, later sequence), else `None` (also when the server
    /// cannot be asked: the caller then reports the lease lost, as before).
    async fn newer_copy(&self, h: &Held) -> Option<u64> {
        let ask = async {
            let stream = self.js.get_stream_no_info(&self.stream).await.ok()?;
            let m = stream
                .get_last_raw_message_by_subject(h.msg.subject.as_str())
                .await
                .ok()?;
            let id = id_of(&m.headers, &m.payload)?;
            (id == h.envelope.id && m.sequence > sequence(&h.msg)).then_some(m.sequence)
        };
        tokio::time::timeout(self.request_timeout, ask)
            .await
            .ok()
            .flatten()
    }

    /// Deletes the copy at `seq`, superseded by a later one. If that fails, two copies
    /// are left: the older is acked when both are held (see `fetch`), or delivered
    /// twice (at least once, as always).
    async fn delete_copy(&self, seq: u64) {
        let delete = async {
            let stream = self.js.get_stream_no_info(&self.stream).await?;
            stream.delete_message(seq).await.map_err(Into::into)
        };
        let deleted: Result<Result<bool, async_nats::Error>, _> =
            tokio::time::timeout(self.request_timeout, delete).await;
        if !matches!(deleted, Ok(Ok(_))) {
            tracing::warn!(
                stream = %self.stream,
                seq,
                "postbox: could not delete a superseded copy of a retried message"
            );
        }
    }

    /// Makes room in a full `held` for the messages behind it: moves up to `n` (at most
    /// [`MOVE_AT_ONCE`](super::hold::MOVE_AT_ONCE)) held deliveries that are not due at `now` (those due last) to
    /// the stream's tail, as `retry_later` does (a copy with their not-before and
    /// attempts, then an ack of the delivery), if the consumer has messages not yet
    /// delivered besides the copies moved before. Without it, a
    /// process holding `max_held` deliveries scheduled for later (the retries of a
    /// dependency that is down) fetches nothing more, and messages that are due — for
    /// another destination — wait behind them until those are due. Returns how many
    /// moved.
    async fn make_room(
        &self,
        held: &mut BTreeMap<MessageId, Held>,
        n: usize,
        now: SystemTime,
    ) -> usize {
        // `held` is locked meanwhile, and `keep_alive` needs it: on a slow server (each
        // move is two round trips) making room ends a quarter of `ack_wait` after it
        // began, a move in progress then given up, before the held deliveries go
        // unrefreshed long enough for the server to deliver them to another process.
        let until = Instant::now().checked_add(self.ack_wait() / 4);
        let left = || {
            until.map_or(Duration::MAX, |u| {
                u.saturating_duration_since(Instant::now())
            })
        };
        let mut consumer = self
            .consumer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let asked = tokio::time::timeout(self.request_timeout.min(left()), consumer.info());
        let behind = match asked.await {
            Ok(Ok(info)) => info.num_pending,
            _ => return 0,
        };
        // What is behind besides the copies moved earlier.
        let others = {
            let mut moved = self.lock_moved();
            moved.retain(|_, at| at.elapsed() < MOVED_FOR);
            behind.saturating_sub(moved.len() as u64)
        };
        let later = due_last(
            held.iter().map(|(&id, h)| (id, h.waiting(now))),
            n,
            others,
            now,
        );
        let mut moved = 0;
        for (_, id) in later {
            let left = left();
            if left.is_zero() {
                break;
            }
            let h = held.remove(&id).expect("listed from held");
            let step = async {
                let behind = match self
                    .publish_copy(&h, &h.envelope, "m", sequence(&h.msg))
                    .await
                {
                    Ok(_) => true,
                    // A newer copy of this very message is the subject's last (an
                    // earlier move or retry whose ack was lost): it is already behind,
                    // so the delivery is acked, as after a move. Anything else: settled
                    // elsewhere meanwhile (module docs), not ours to hold.
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                        self.newer_copy(&h).await.is_some()
                    }
                    Err(e) => return Err(e.to_string()),
                };
                if !behind {
                    return Ok(());
                }
                // A copy is behind now, whatever becomes of the ack.
                self.lock_moved().insert(id, Instant::now());
                self.confirm_ack(&h.msg, AckKind::Ack)
                    .await
                    .map_err(|e| e.to_string())
            };
            let settled = tokio::time::timeout(left, step)
                .await
                .unwrap_or_else(|_| Err("no answer before the time for making room ended".into()));
            if let Err(e) = settled {
                // If the copy was stored, the held delivery is its older copy: a later
                // fetch acks the older one (see `fetch`).
                tracing::debug!(%id, error = %e, "postbox: could not move a held delivery to the tail");
                let mut h = h;
                h.copied = true;
                held.insert(id, h);
                break;
            }
            moved += 1;
        }
        if moved > 0 {
            tracing::debug!(
                moved,
                "postbox: held deliveries not yet due moved to the stream's tail"
            );
        }
        moved
    }

    fn lock_pacer(&self) -> std::sync::MutexGuard<'_, RoomPacer> {
        // Only its own fields change under this lock.
        self.pacer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_moved(&self) -> std::sync::MutexGuard<'_, HashMap<MessageId, Instant>> {
        // Only map operations run under this lock.
        self.moved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A delivery of `id` came back: if it was a copy `make_room` moved, it is no
    /// longer waiting behind.
    fn fetched_back(&self, id: MessageId) {
        let mut moved = self.lock_moved();
        if !moved.is_empty() {
            moved.remove(&id);
        }
    }

    /// Keeps holding the delivery, uncounted and scheduled for `not_before`: nothing
    /// goes to the server (module docs, "Leases").
    async fn release(&self, token: LeaseToken, not_before: SystemTime) -> Result<(), QueueError> {
        let mut held = self.held.lock().await;
        let mut h = Self::take(&mut held, token)?;
        h.envelope.attempts = h.envelope.attempts.saturating_sub(1);
        h.envelope.not_before = not_before;
        h.state = HeldState::Scheduled(not_before);
        h.leased = false; // settled here, with nothing published
        held.insert(token.id, h);
        Ok(())
    }

    async fn dead_letter(&self, token: LeaseToken, reason: &str) -> Result<(), QueueError> {
        // Published without the lock, as in `retry_later`.
        let h = Self::take(&mut *self.held.lock().await, token)?;
        let mut headers = headers(&h.envelope);
        headers.insert(H_REASON, encode_reason(reason).as_str());
        let publish = Publish::build()
            .payload(Bytes::from(h.envelope.encode()))
            .headers(headers)
            // Per delivered copy: a later copy of the same message (enqueued again after
            // its dead letter) is not dropped as a duplicate within the window.
            .message_id(format!("{}.dead.s{}", h.envelope.id, sequence(&h.msg)));
        let declarations = self.declarations.load(Ordering::Acquire);
        let published = self.publish(self.dead_subject.clone(), publish).await;
        if let Err(e) = published {
            self.put_back(vec![h]).await;
            return Err(self
                .publish_failed(e, "publish dead letter", declarations)
                .await);
        }
        if let Err(e) = self.confirm_ack(&h.msg, AckKind::Term).await {
            let e = classify_dyn(&*e, "terminate after dead letter");
            self.put_back(vec![h]).await;
            return Err(e);
        }
        self.settle_copy(&h).await;
        Ok(())
    }

    async fn stream_messages(&self, name: &str) -> Result<stream::State, QueueError> {
        let s = self
            .js
            .get_stream(name)
            .await
            .map_err(|e| classify(e, "stream info"))?;
        Ok(s.cached_info().state.clone())
    }

    async fn depth(&self) -> Result<Depth, QueueError> {
        let live = self.stream_messages(&self.stream).await?.messages;
        let dead = self.stream_messages(&self.dead_stream).await?.messages;
        let in_flight = self
            .held
            .lock()
            .await
            .values()
            .filter(|h| matches!(h.state, HeldState::Leased(..)))
            .count() as u64;
        Ok(Depth {
            pending: live.saturating_sub(in_flight),
            in_flight,
            dead,
        })
    }

    /// The dead-letter stream and the sequences it holds now (empty if it holds none).
    async fn dead_stream(
        &self,
    ) -> Result<(stream::Stream<()>, std::ops::RangeInclusive<u64>), QueueError> {
        let state = self.stream_messages(&self.dead_stream).await?;
        let stream = self
            .js
            .get_stream_no_info(&self.dead_stream)
            .await
            .map_err(|e| classify(e, "get stream"))?;
        #[allow(clippy::reversed_empty_ranges)] // deliberately empty
        let seqs = if state.messages > 0 {
            state.first_sequence..=state.last_sequence
        } else {
            1..=0
        };
        Ok((stream, seqs))
    }

    /// Reads the dead-letter stream oldest first until every id is found (as often as
    /// it is listed: see `WantedIds`), deleting each match by its sequence.
    async fn discard_dead_letters(&self, ids: &[MessageId]) -> Result<u64, QueueError> {
        let mut wanted = super::WantedIds::new(ids.iter().copied());
        if wanted.is_empty() {
            return Ok(0);
        }
        let (stream, seqs) = self.dead_stream().await?;
        let mut discarded = 0;
        let mut seq = *seqs.start();
        while !wanted.is_empty() && seqs.contains(&seq) {
            match stream.get_raw_message(seq).await {
                Ok(m) => {
                    if !Envelope::decode(&m.payload).is_ok_and(|e| wanted.take(&e.id)) {
                        seq += 1;
                        continue;
                    }
                    match stream.delete_message(seq).await {
                        Ok(true) => discarded += 1,
                        Ok(false) => {}
                        // The server refused: fine if another discard deleted it meanwhile.
                        Err(e)
                            if matches!(e.kind(), stream::DeleteMessageErrorKind::JetStream(_))
                                && stream.get_raw_message(seq).await.is_err_and(|g| {
                                    g.kind() == stream::RawMessageErrorKind::NoMessageFound
                                }) => {}
                        Err(e) => return Err(classify(e, "delete dead letter")),
                    }
                }
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(classify(e, "read dead letter")),
            }
            seq += 1;
        }
        Ok(discarded)
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let (stream, seqs) = self.dead_stream().await?;
        let mut out = Vec::new();
        let mut seq = *seqs.start();
        while out.len() < max && seqs.contains(&seq) {
            match stream.get_raw_message(seq).await {
                Ok(m) => {
                    let Ok(envelope) = Envelope::decode(&m.payload) else {
                        // Set aside by `lease` (see `set_aside`): readable, not decodable.
                        tracing::warn!(stream = %self.dead_stream, seq, "postbox: undecodable dead letter skipped");
                        seq += 1;
                        continue;
                    };
                    let reason = m
                        .headers
                        .get(H_REASON)
                        .map(|v| decode_reason(v.as_str()))
                        .unwrap_or_default();
                    out.push(DeadLetter { envelope, reason });
                }
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(classify(e, "read dead letter")),
            }
            seq += 1;
        }
        Ok(out)
    }
}

/// The streams and subjects of the queue `name`.
struct Names {
    stream: String,
    dead_stream: String,
    /// Followed by the key's subject token.
    subject_prefix: String,
    dead_subject: String,
}

impl Names {
    fn of(name: &str) -> Self {
        Self {
            stream: format!("POSTBOX_{name}"),
            dead_stream: format!("POSTBOX_{name}_DEAD"),
            subject_prefix: format!("postbox.{name}.k."),
            dead_subject: format!("postbox.{name}.dead"),
        }
    }
}

/// Creates the work and dead-letter streams if missing, sets postbox's fields on an
/// existing work stream (the rest of its config is the operator's), and creates or
/// updates the durable consumer of the queue `options` names: at connect, and again
/// when a call finds one deleted.
async fn declare(
    js: &Context,
    options: &NatsOptions,
    names: &Names,
) -> Result<PullConsumer, QueueError> {
    let name = &options.name;
    let stream = &names.stream;
    // One past what the server holds is no limit (as it was before a capacity was
    // left alone when none is given).
    let capacity = options.capacity.map(|c| i64::try_from(c).unwrap_or(-1));
    // The server refuses a window longer than a `max_age` an operator set, and stores
    // a zero window as its default of 2 minutes.
    let window = |config: &stream::Config| {
        let mut window = options.duplicate_window;
        if window.is_zero() {
            window = Duration::from_secs(120);
        }
        if !config.max_age.is_zero() {
            window = window.min(config.max_age);
        }
        window
    };
    let ours = |config: &mut stream::Config| {
        config.subjects = vec![format!("{}*", names.subject_prefix)];
        config.retention = RetentionPolicy::WorkQueue;
        config.storage = StorageType::File;
        config.duplicate_window = window(config);
        // Without a capacity of its own, a process leaves the stream's limit as it
        // is (set by another process, or by hand): a replayer or a tool made without
        // one took every producer's limit away.
        if let Some(cap) = capacity {
            config.max_messages = cap;
        }
        config.discard = DiscardPolicy::New;
        config.allow_direct = true;
    };
    // Twice at most: a stream another process created between the lookup and the
    // create (with other options, say) is then found and updated.
    let mut existing = lookup(js, stream).await?;
    for round in 0..2 {
        let Some(info) = existing.take() else {
            let mut config = stream::Config {
                name: stream.clone(),
                max_messages: -1,
                ..Default::default()
            };
            ours(&mut config);
            match js.create_stream(config).await {
                Ok(_) => break,
                Err(e) if name_exists(&e) => {
                    existing = lookup(js, stream).await?;
                    if round == 1 {
                        return Err(QueueError::Unavailable(
                            format!("nats stream {stream}: being created and deleted by others meanwhile")
                                .into(),
                        ));
                    }
                    continue;
                }
                Err(e) => return Err(classify(e, "create stream")),
            }
        };
        // Only the fields postbox relies on are changed: what an operator set (replicas,
        // placement, limits of their own) stays, and an unchanged stream is left alone.
        let held = info.state.messages;
        if let Some(cap) = options.capacity
            && held > cap
        {
            // The server applies a lower `max_msgs` by deleting the oldest messages,
            // even with `discard: new`: never ask it to.
            return Err(QueueError::Backend(
                format!(
                    "nats queue {name}: capacity {cap} is below the {held} messages it \
                     holds (the server would delete the oldest to fit); drain it first \
                     or keep a capacity of at least {held}"
                )
                .into(),
            ));
        }
        let mut config = info.config.clone();
        ours(&mut config);
        if config != info.config {
            js.update_stream(&config)
                .await
                .map_err(|e| classify(e, "update stream"))?;
        }
        break;
    }
    // The dead letters' window is the work stream's: a dead letter published again
    // after a lost reply is stored once within it too.
    let mut dead = lookup(js, &names.dead_stream).await?;
    if dead.is_none() {
        let mut config = stream::Config {
            name: names.dead_stream.clone(),
            subjects: vec![names.dead_subject.clone()],
            storage: StorageType::File,
            allow_direct: true,
            ..Default::default()
        };
        config.duplicate_window = window(&config);
        match js.create_stream(config).await {
            Ok(_) => {}
            // Created meanwhile by another process with another window (an identical
            // create succeeds): updated below.
            Err(e) if name_exists(&e) => {
                dead = lookup(js, &names.dead_stream).await?;
            }
            Err(e) => return Err(classify(e, "create dead-letter stream")),
        }
    }
    if let Some(info) = dead
        && info.config.duplicate_window != window(&info.config)
    {
        let mut config = info.config.clone();
        config.duplicate_window = window(&config);
        js.update_stream(&config)
            .await
            .map_err(|e| classify(e, "update dead-letter stream"))?;
    }
    js.create_consumer_on_stream(
        pull::Config {
            durable_name: Some(CONSUMER.into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: options.ack_wait,
            max_deliver: -1,
            // No limit the server keeps for all processes together: each process
            // bounds its own hold (`max_held`). A shared limit could be filled by the
            // holds of several processes, each below its own bound, with retries for
            // later: nothing due was delivered then, and no hold was full enough to
            // move its retries aside.
            max_ack_pending: -1,
            ..Default::default()
        },
        stream.as_str(),
    )
    .await
    .map_err(|e| classify(e, "create consumer"))
}

/// Whether a create failed because a stream of that name exists (with another config:
/// an identical create succeeds).
fn name_exists(e: &async_nats::jetstream::context::CreateStreamError) -> bool {
    matches!(e.kind(), CreateStreamErrorKind::JetStream(j)
        if j.error_code() == ErrorCode::STREAM_NAME_EXIST)
}

/// The stream's info, `None` if there is no such stream; any other failure is an error
/// (never read as "no stream" or "no messages": the capacity check must not pass by
/// default).
async fn lookup(js: &Context, stream: &str) -> Result<Option<stream::Info>, QueueError> {
    match js.get_stream(stream).await {
        Ok(s) => Ok(Some(s.cached_info().clone())),
        Err(e) => match e.kind() {
            async_nats::jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(classify(e, "look up stream")),
        },
    }
}

/// Every `ack_wait / 4` (at most a second), tells the server this process still works
/// on each delivery it holds that it has not touched for `ack_wait / 4`: each is
/// refreshed at most half an `ack_wait` after the last time (plus the read of the
/// consumer between ticks, at most half an `ack_wait` or a second), so the server
/// delivers it again only once the process is gone. `ack_wait` is the consumer's on the
/// server, which another process may have declared with its own. Ends when the last
/// [`NatsQueue`] clone is dropped.
async fn keep_held_alive(inner: std::sync::Weak<Inner>) {
    let mut last = tokio::time::Instant::now();
    loop {
        let Some(ack_wait) = inner.upgrade().map(|i| i.ack_wait()) else {
            return;
        };
        // At least every second: a smaller `ack_wait` set since is noticed in time.
        let period = (ack_wait / 4).clamp(Duration::from_millis(25), Duration::from_secs(1));
        // A period from the start of the last round, not its end: the time its work
        // took is not added to the gap between refreshes.
        tokio::time::sleep_until(last + period).await;
        last = tokio::time::Instant::now();
        let Some(inner) = inner.upgrade() else { return };
        // The refreshes first: a slow read of the consumer must not delay them. (One
        // after the other: a consumer found created anew forgets the held deliveries,
        // which must not happen between the refreshes' reading and sending them.)
        inner.keep_alive().await;
        inner
            .refresh_consumer((ack_wait / 2).min(Duration::from_secs(1)))
            .await;
    }
}

impl fmt::Debug for NatsQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsQueue")
            .field("stream", &self.inner.stream)
            .field("capacity", &self.inner.capacity)
            .finish_non_exhaustive()
    }
}

impl Queue for NatsQueue {
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
        // On a task of its own too: dropped between storing a held delivery's copy and
        // acking the original (making room in the hold), it left two live copies of
        // the message. Now what it takes is leased (to no one) and comes back when
        // that lease ends, as the embedded queue's does.
        let inner = self.inner.clone();
        settling(async move { inner.lease(max, lease_for, now).await })
    }

    // The calls that settle a lease run to the end on a task of their own (see
    // `super::settling`): dropped halfway, one would leave a delivery it took out of
    // the hold neither settled nor kept alive, back only after `ack_wait` with an
    // attempt more (and a `retry_later` whose copy was stored, delivered twice).

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

/// The stream sequence of a delivery (0 if its reply subject carries none).
fn sequence(msg: &async_nats::jetstream::Message) -> u64 {
    msg.info().map_or(0, |i| i.stream_sequence)
}

fn headers(e: &Envelope) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(H_ID, e.id.to_string().as_str());
    if let Some(v) = header_value(&e.idempotency_key) {
        h.insert(H_KEY, v);
    }
    if let Some(v) = header_value(&e.destination) {
        h.insert(H_DEST, v);
    }
    h.insert(H_NOT_BEFORE, ms_ceil(e.not_before).to_string().as_str());
    if e.attempts > 0 {
        h.insert(H_ATTEMPTS, e.attempts.to_string().as_str());
    }
    h
}

/// Whether the consumer read now (`fresh`) is the one read before (`known`): the same
/// creation time, or the same consumer restored by a restarted server. nats-server
/// 2.9 gives a consumer a creation time some microseconds off when it first restores
/// it after a restart, with its deliveries and pending acks kept (the acks of held
/// deliveries still work); a consumer deleted and created anew has a creation time
/// of its own and numbers its deliveries from 1 again, below what was seen of the old.
fn same_consumer(
    known: &consumer::Info,
    fresh: &consumer::Info,
    held: &BTreeMap<MessageId, Held>,
) -> bool {
    if fresh.created == known.created {
        return true;
    }
    let apart = (fresh.created.unix_timestamp_nanos() - known.created.unix_timestamp_nanos())
        .unsigned_abs();
    let seen = held
        .values()
        .filter_map(|h| h.msg.info().ok().map(|i| i.consumer_sequence))
        .fold(known.delivered.consumer_sequence, u64::max);
    apart < 1_000_000_000 && fresh.delivered.consumer_sequence >= seen
}

/// At least the size of the headers [`headers`] and `enqueue` give `e` (names, values
/// and separators), without building them.
fn header_room(e: &Envelope) -> usize {
    e.idempotency_key.len() + e.destination.len() + 320
}

/// The headers an undecodable message of `payload` bytes is dead-lettered with: its own
/// (`copied`), `Nats-Msg-Id: id` and `Postbox-Reason`, as many as fit in `max_payload`
/// beside the payload (0: no limit known). A server closes the connection on a larger
/// publish, and the move failed forever. The reason is cut to the room left, or left
/// out; without room for the message id, the message's own headers alone (a move
/// retried after a lost ack may then store a second copy), or none. `None` if the
/// payload alone is too large.
fn dead_headers(
    copied: HeaderMap,
    reason: &str,
    id: &str,
    payload: usize,
    max_payload: usize,
) -> Option<HeaderMap> {
    // On the wire: `NATS/1.0\r\n`, a `Name: value\r\n` line each, `\r\n`; nothing
    // for no headers.
    let line = |name: &str, value: &str| name.len() + value.len() + 4;
    let block = |h: &HeaderMap| {
        if h.is_empty() {
            return 0;
        }
        h.iter()
            .flat_map(|(name, values)| values.iter().map(move |v| line(name.as_ref(), v.as_str())))
            .sum::<usize>()
            + 12
    };
    let room = match max_payload {
        0 => usize::MAX,
        max => max.checked_sub(payload)?,
    };
    let mut with_id = copied.clone();
    with_id.insert("Nats-Msg-Id", id);
    let used = block(&with_id);
    if used <= room {
        let left = (room - used).saturating_sub(line(H_REASON, ""));
        let value = encode_reason_within(reason, left.min(REASON_MAX));
        if !value.is_empty() {
            with_id.insert(H_REASON, value.as_str());
        }
        Some(with_id)
    } else if block(&copied) <= room {
        Some(copied)
    } else {
        Some(HeaderMap::new())
    }
}

/// A dead letter's reason as a `Postbox-Reason` value: percent-encoded UTF-8, every
/// byte outside printable ASCII and `%` itself as `%XX` (a header value carries no
/// line break, and the replayer's reasons hold error texts and `µs`), cut to
/// [`REASON_MAX`] bytes encoded (the room kept for it, [`HEADROOM`]), at a character's
/// end.
fn encode_reason(reason: &str) -> String {
    encode_reason_within(reason, REASON_MAX)
}

/// [`encode_reason`] cut to `max` bytes encoded.
fn encode_reason_within(reason: &str, max: usize) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(reason.len().min(max));
    for c in reason.chars() {
        let mut utf8 = [0; 4];
        let bytes = c.encode_utf8(&mut utf8).as_bytes();
        let plain = bytes.len() == 1 && (0x20..0x7f).contains(&bytes[0]) && bytes[0] != b'%';
        let len = if plain { 1 } else { 3 * bytes.len() };
        if out.len() + len > max {
            break;
        }
        if plain {
            out.push(c);
        } else {
            for b in bytes {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// The reason [`encode_reason`] wrote. A `%` not followed by two hex digits is kept as
/// it is (a reason written before the encoding, `"50% done"`), and bytes that do not
/// decode to UTF-8 are replaced.
fn decode_reason(value: &str) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `s` if it can travel as a header value (printable ASCII).
fn header_value(s: &str) -> Option<&str> {
    (!s.is_empty() && s.bytes().all(|b| (0x20..0x7f).contains(&b))).then_some(s)
}

/// The id of a stored message: its `Postbox-Id`, else its envelope's (a message another
/// producer wrote without the header).
fn id_of(headers: &async_nats::HeaderMap, payload: &[u8]) -> Option<MessageId> {
    headers
        .get(H_ID)
        .and_then(|v| v.as_str().parse::<MessageId>().ok())
        .or_else(|| Envelope::decode(payload).ok().map(|e| e.id))
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    s.reserve(2 * bytes.len());
    for &b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

/// The stream's `max_msgs` refused the message (not its other limits, nor a store
/// failure, which share the error code 10077).
fn is_full(e: &PublishError) -> bool {
    e.to_string().contains("maximum messages exceeded")
}

/// Connection problems (timeouts, a broken pipe, no responders) are
/// [`QueueError::Unavailable`]; the rest is a backend error.
fn classify<E: std::error::Error + Send + Sync + 'static>(e: E, what: &str) -> QueueError {
    if is_connection_problem(&e) {
        QueueError::Unavailable(format!("nats {what}: {e}").into())
    } else {
        QueueError::Backend(format!("nats {what}: {e}").into())
    }
}

fn classify_dyn(e: &(dyn std::error::Error + Send + Sync + 'static), what: &str) -> QueueError {
    if is_connection_problem(e) {
        QueueError::Unavailable(format!("nats {what}: {e}").into())
    } else {
        QueueError::Backend(format!("nats {what}: {e}").into())
    }
}

fn is_connection_problem(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string().to_ascii_lowercase();
        if [
            "timed out",
            "broken pipe",
            "no responders",
            "disconnect",
            "connection",
            // async-nats' reading of a publish nobody answered (JetStream electing a
            // stream leader, or not running): `PublishErrorKind::StreamNotFound`.
            "no stream found",
            // JetStream's 10008, "JetStream system temporarily unavailable".
            "temporarily unavailable",
            // async-nats' reading of a JetStream API request nobody answered
            // (`RequestErrorKind::NoResponders`: JetStream not running, or restarting).
            "requested jetstream resource does not exist",
        ]
        .iter()
        .any(|needle| text.contains(needle))
        {
            return true;
        }
        if err.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
}

fn ms_floor(t: SystemTime) -> u64 {
    u64::try_from(since_epoch(t).as_millis()).unwrap_or(u64::MAX)
}

fn ms_ceil(t: SystemTime) -> u64 {
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

    /// A publish nobody answered (async-nats: "no stream found for given subject") and
    /// JetStream's "temporarily unavailable" are worth another try later: `Unavailable`,
    /// as `retry_later` and `dead_letter` already answered them, not `Backend`.
    #[test]
    fn jetstream_not_answering_is_unavailable() {
        let e = PublishError::new(PublishErrorKind::StreamNotFound);
        assert!(matches!(classify(e, "publish"), QueueError::Unavailable(_)));
        #[derive(Debug)]
        struct Reply;
        impl std::fmt::Display for Reply {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JetStream system temporarily unavailable (code 503, error code 10008)")
            }
        }
        impl std::error::Error for Reply {}
        assert!(matches!(
            classify(Reply, "depth"),
            QueueError::Unavailable(_)
        ));
        let other = PublishError::new(PublishErrorKind::WrongLastSequence);
        assert!(matches!(classify(other, "publish"), QueueError::Backend(_)));
    }

    /// A reason is cut to `REASON_MAX` bytes as it travels (encoded, up to three times
    /// its length), never inside a character, and reads back as the text it kept.
    #[test]
    fn a_reason_is_cut_encoded_at_a_character_and_reads_back() {
        let long = "é\n".repeat(400);
        let encoded = encode_reason(&long);
        assert!(encoded.len() <= REASON_MAX, "{}", encoded.len());
        assert!(encoded.len() > REASON_MAX - 9);
        let back = decode_reason(&encoded);
        assert!(long.starts_with(&back), "{back:?}");
        assert!(!back.contains('\u{fffd}'));
        let short = "400: délai 500µs\n100%";
        assert_eq!(decode_reason(&encode_reason(short)), short);
        assert_eq!(decode_reason("50% done"), "50% done");
    }

    /// Bytes `h` takes in a publish, as async-nats writes it (nothing when empty).
    fn wire(h: &HeaderMap) -> usize {
        if h.is_empty() {
            return 0;
        }
        let mut n = "NATS/1.0\r\n\r\n".len();
        for (name, values) in h.iter() {
            for v in values {
                n += format!("{}: {}\r\n", AsRef::<str>::as_ref(name), v.as_str()).len();
            }
        }
        n
    }

    /// An undecodable message's dead-letter copy never exceeds the server's
    /// `max_payload`: its reason is cut to the room left beside the payload, then its
    /// message id and its own headers are left out; a payload alone too large has no
    /// copy. (The reason was added whatever the size, and the server closed the
    /// connection on every try to move it.)
    #[test]
    fn a_dead_letter_copy_fits_in_max_payload() {
        let mut own = HeaderMap::new();
        own.insert("Trace", "abc");
        let reason = "undecodable: not an envelope ".repeat(40);
        let max = 1000;
        for payload in [0, 200, 900, 950, 990, 995, 1000] {
            let h = dead_headers(own.clone(), &reason, "work.seq7.dead", payload, max)
                .expect("the payload fits");
            assert!(payload + wire(&h) <= max, "{payload}: {}", wire(&h));
        }
        let roomy = dead_headers(own.clone(), &reason, "work.seq7.dead", 200, max).unwrap();
        assert_eq!(roomy.get("Nats-Msg-Id").unwrap().as_str(), "work.seq7.dead");
        assert_eq!(roomy.get("Trace").unwrap().as_str(), "abc");
        assert_eq!(
            roomy.get(H_REASON).unwrap().as_str(),
            encode_reason(&reason),
            "the whole reason fits"
        );
        let tight = dead_headers(own.clone(), &reason, "work.seq7.dead", 900, max).unwrap();
        let cut = tight.get(H_REASON).unwrap().as_str();
        assert!(
            encode_reason(&reason).starts_with(cut) && cut.len() < 100,
            "{cut}"
        );
        assert!(tight.get("Nats-Msg-Id").is_some());
        let bare = dead_headers(own.clone(), &reason, "work.seq7.dead", 995, max).unwrap();
        assert!(bare.is_empty());
        assert!(dead_headers(own.clone(), &reason, "id", 1001, max).is_none());
        let unknown = dead_headers(own, &reason, "id", 1 << 20, 0).unwrap();
        assert_eq!(
            unknown.get(H_REASON).unwrap().as_str(),
            encode_reason(&reason)
        );
    }
}
