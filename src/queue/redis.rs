//! [`RedisQueue`]: a [`Queue`] on Redis Streams (feature `redis`).
//!
//! # Example
//! ```no_run
//! use postbox::queue::{DeferReason, Envelope, Queue, RedisOptions, RedisQueue};
//! use std::time::{Duration, SystemTime};
//!
//! # async fn run() -> Result<(), postbox::queue::QueueError> {
//! // URL from `POSTBOX_REDIS_URL`, else redis://127.0.0.1:6379/
//! let queue = RedisQueue::connect(RedisOptions::new("orders")).await?;
//! let env = Envelope::new("api:443", "POST", "https://api/orders", "{}", DeferReason::CircuitOpen);
//! queue.enqueue(env).await?;
//! for leased in queue.lease(10, Duration::from_secs(30), SystemTime::now()).await? {
//!     queue.ack(&[leased.token]).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout in Redis
//!
//! Every key of a queue named `NAME` starts with `postbox:{NAME}:` (the braces are a
//! cluster hash tag: all keys of one queue live on one shard, as the scripts need).
//! The client is a single-node one, though: Redis Cluster and Sentinel are not
//! supported.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `…:stream` | stream | one entry per live message (pending or in flight); consumer group `postbox` |
//! | `…:dead` | stream | dead letters, oldest first |
//! | `…:msgs` | hash | message id → stream entry id (messages read by `lease` at least once) |
//! | `…:attempts` | hash | message id → the lease generation: releases × 2³² + delivery attempts |
//! | `…:nb` | hash | message id → not-before (ms) set by `retry_later` |
//! | `…:keys` | hash | idempotency key → message id (de-duplication) |
//! | `…:idkeys` | hash | message id → idempotency key (`""` for none) of messages read by `lease`, to free the key of one whose entry is gone |
//! | `…:leases` | sorted set | message id scored by lease deadline (ms) |
//! | `…:delayed` | sorted set | message id scored by not-before (ms), read but not yet due |
//! | `…:ready` | sorted set | due message ids (score 0, so ordered by id) |
//! | `…:done` | sorted set | ids acked or dead-lettered while the stream may still hold an unread copy of them, scored by the newest entry's millisecond at the time |
//!
//! Each stream entry has the fields `id` (UUID text), `idempotency_key`, `destination`,
//! `method`, `uri`, `created_at_ms`, `not_before_ms`, `attempts` (as enqueued), `claim`
//! (`1`: written together with its key's claim) and `envelope` (the versioned binary
//! envelope, `docs/envelope.md`). A dead-letter entry
//! has the same fields, with `attempts` and `not_before_ms` as they were when it died,
//! plus `reason` and `dead_at_ms`. So any Redis client can read both streams, e.g.
//! `XRANGE postbox:{orders}:dead - +`.
//!
//! Every operation is atomic — one Lua script — except an enqueue to a queue without a
//! capacity: two native commands in one `MULTI`/`EXEC`, the `XADD` and then `HSETNX` of
//! the key in `…:keys` (a script's `redis.call`s cost Redis about twice the CPU of native
//! commands). The entry is written with its claim, so a claimed key has its entry. A
//! duplicate's `XADD` cannot be skipped, so for a moment the stream holds an extra entry
//! whose `idempotency_key` belongs to another id (or a second entry of a live id): the
//! enqueue deletes it before it answers
//! [`Enqueued::Duplicate`](super::Enqueued), and `lease` deletes any such entry it reads
//! (one left by a client that died in between), so it is never delivered; so does it with
//! a copy of a message already acked or dead (an enqueue retried after its reply was lost
//! can write one), which `…:done` remembers until `lease` has read past every entry that
//! existed when the message finished. An entry whose key nobody claims is claimed by
//! the `lease` that reads it if it was written by hand (no `claim` field); one with
//! `claim` lost its key to another message (a duplicate whose enqueue failed before it
//! deleted its entry, delivered once that message was acked) and is deleted. A plain consumer of the stream should likewise
//! skip an entry whose key, in `…:keys`, maps to another `id`.

use super::{
    DeadLetter, Depth, Enqueued, Envelope, LeaseToken, Leased, MessageId, Queue, QueueError,
};
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{RedisError, Script, Value};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// The environment variable that overrides the default URL.
pub const REDIS_URL_ENV: &str = "POSTBOX_REDIS_URL";
/// The URL used when neither [`RedisOptions::with_url`] nor [`REDIS_URL_ENV`] is set.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// The most messages one `lease` takes (a larger `max` takes this many).
const MAX_LEASE: usize = 100_000;
const GROUP: &str = "postbox";
const CONSUMER: &str = "postbox";

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("redis/prelude.lua"),
                include_str!(concat!("redis/", $file))
            ))
        })
    };
}

static ENQUEUE: LazyLock<Script> = script!("enqueue.lua");
static LEASE: LazyLock<Script> = script!("lease.lua");
static ACK: LazyLock<Script> = script!("ack.lua");
static RETRY: LazyLock<Script> = script!("retry.lua");
static DEAD: LazyLock<Script> = script!("dead.lua");
static SETTLE: LazyLock<Script> = script!("settle.lua");
static UNCLAIM: LazyLock<Script> = script!("unclaim.lua");

/// Where and how [`RedisQueue::connect`] connects.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    name: String,
    url: Option<String>,
    capacity: Option<u64>,
    response_timeout: Duration,
    max_message_size: usize,
}

/// A durable [`Queue`] on Redis Streams.
///
/// Leasing reads the stream through a consumer group (`XREADGROUP`); a message whose
/// lease expired, or whose not-before has come, is claimed again with `XCLAIM`. Lease
/// deadlines and not-before are kept in sorted sets scored by the `now` passed to
/// [`lease`](Queue::lease), not by Redis' idle time (which is why this uses `XCLAIM`
/// and not `XAUTOCLAIM`'s one min-idle-time), so they follow the trait exactly.
///
/// # Durability
///
/// `enqueue` returns after Redis replied to the transaction that wrote the message. That is
/// durable against a crash only when the server runs with `appendonly yes` and
/// `appendfsync always` (Redis then fsyncs its append-only file before it replies, and
/// concurrent writers share one fsync). With the default `appendfsync everysec` up to one
/// second of acknowledged messages can be lost in a power failure; with persistence off,
/// a server restart loses everything.
///
/// The server must not evict the queue's keys (which have no expiry): `maxmemory-policy`
/// `noeviction` (the default) or a `volatile-*` one. An `allkeys-*` policy would drop
/// whole keys once memory is full (the stream and its messages, the leases, whose
/// messages then are never delivered again), so [`connect`](RedisQueue::connect)
/// refuses a server that says it has one (a server that hides `CONFIG` is taken as
/// it is).
///
/// # Connection loss
///
/// A call made while the server is unreachable fails with [`QueueError::Unavailable`];
/// the connection is re-established in the background and a later call succeeds once
/// the server is back. A call left unanswered for the response timeout, or refused by
/// a demoted node (`READONLY`, `MASTERDOWN`), also has the connection made again in the
/// background (at most every 2 s; after a timeout only if the old connection answers
/// no `PING`). A script or transaction either ran entirely or not at all, but a call that
/// failed with `Unavailable` may still have run (the reply was lost): an enqueue of the
/// same envelope retried after that is stored once, thanks to its idempotency key. It is
/// answered with the same id: without a capacity as [`Enqueued::Stored`] (its key's
/// claim is that id's; the retry's extra entry is deleted by `lease` unread), with one
/// as [`Enqueued::Duplicate`].
///
/// # Group commit
///
/// Concurrent enqueues share one multiplexed connection, which writes every request
/// waiting at the time in one go; Redis runs all it read in one pass of its event loop
/// and, with `appendfsync always`, makes them durable with one write and one fsync of its
/// append-only file before it replies. With a capacity, a background task (spawned by
/// [`connect`](Self::connect), so call it inside a Tokio runtime) sends every enqueue
/// waiting at the time, up to 128, in one script call, so the script's fixed cost is
/// shared.
///
/// # Clone
///
/// Clones share one multiplexed connection (and, with a capacity, the batching task).
///
/// # Runtime
///
/// The queue is bound to the Tokio runtime it was connected on: its background tasks
/// (the batching task, a connection made again after one stopped answering) run there,
/// so keep that runtime running while the queue is used.
#[derive(Clone)]
pub struct RedisQueue {
    link: Arc<Link>,
    keys: Arc<[String; 11]>,
    capacity: Option<u64>,
    max_message_size: usize,
    /// With a capacity: the task that runs `enqueue.lua` for batches of enqueues.
    batcher: Option<mpsc::Sender<Pending>>,
}

/// An enqueue waiting for the batcher: the arguments of `enqueue.lua` and where to
/// answer.
struct Pending {
    args: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<(i64, String), (bool, String)>>,
}

/// Most enqueues sent in one `enqueue.lua` call (queues with a capacity).
const MAX_BATCH: usize = 128;

/// The connection is made again at most this often (see [`Link::failed`]).
const REMAKE_EVERY: Duration = Duration::from_secs(2);

/// The connection to Redis, made again when it stops answering.
///
/// The `ConnectionManager` reconnects by itself only once its socket fails, and a
/// server that stops answering without closing the connection (a host gone, a network
/// partition, a load balancer's idle cut that sends nothing) leaves the socket open for
/// the kernel's retransmission timeout, about 15 minutes: every call timed out until
/// then. So does a connection to a node demoted by a failover (`READONLY`) that a
/// DNS name now puts elsewhere.
pub(crate) struct Link {
    conn: std::sync::RwLock<ConnectionManager>,
    client: ::redis::Client,
    config: ConnectionManagerConfig,
    /// The runtime `connect` ran on: a connection made again runs its tasks there, not
    /// on whichever runtime a failing call ran on (which may end first).
    runtime: tokio::runtime::Handle,
    /// When the connection was last made again, if it was: at most every
    /// [`REMAKE_EVERY`], one at a time.
    remade: std::sync::Mutex<(Option<tokio::time::Instant>, bool)>,
}

impl Link {
    /// Connects to `url` for `what` (named in the errors about the runtime and the URL;
    /// the others name the server), on the current runtime.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] if the server cannot be reached,
    /// [`QueueError::Backend`] for an invalid URL, credentials or database the server
    /// refuses, or outside a Tokio runtime.
    pub(crate) async fn open(
        url: &str,
        what: &str,
        response_timeout: Duration,
    ) -> Result<Arc<Self>, QueueError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            QueueError::Backend(format!("{what}: connecting needs a Tokio runtime: {e}").into())
        })?;
        // No URL in the error: one that does not parse may not be redacted right (a
        // `/` in its password), and the error is logged.
        let client = ::redis::Client::open(url)
            .map_err(|e| QueueError::Backend(format!("{what}: invalid URL: {e}").into()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client.clone(), config.clone())
            .await
            .map_err(|e| {
                let url = crate::queue::envelope::RedactedUri(url);
                // Refused credentials or database (`AUTH`, `SELECT`) are a configuration
                // error, not an outage to wait out.
                match map_err(e) {
                    QueueError::Unavailable(e) => {
                        QueueError::Unavailable(format!("redis at {url:?} unreachable: {e}").into())
                    }
                    e => QueueError::Backend(format!("redis at {url:?}: {e}").into()),
                }
            })?;
        Ok(Arc::new(Self {
            conn: std::sync::RwLock::new(conn),
            client,
            config,
            runtime,
            remade: std::sync::Mutex::new((None, false)),
        }))
    }

    /// The current connection (a cheap clone: calls on it share its socket).
    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// `e` as a [`QueueError`]; a call left unanswered (a timeout) or refused by a
    /// node no longer the primary (`READONLY`, `MASTERDOWN`, also inside a transaction
    /// refused whole) also has the connection made again in the background, unless the
    /// old one still answers a `PING` (calls in flight on the old one end as they
    /// would).
    pub(crate) fn failed(self: &Arc<Self>, e: RedisError) -> QueueError {
        if e.is_timeout() || demoted(&e) {
            self.remake(demoted(&e));
        }
        map_err(e)
    }

    /// Makes the connection again, in the background (at most every
    /// [`REMAKE_EVERY`], one at a time); after a timeout only if the old one does not
    /// answer a `PING`.
    fn remake(self: &Arc<Self>, demoted: bool) {
        {
            let mut remade = self
                .remade
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = tokio::time::Instant::now();
            if remade.1 || remade.0.is_some_and(|at| now < at + REMAKE_EVERY) {
                return;
            }
            *remade = (Some(now), true);
        }
        /// Ends the remake however its task ends (done, panicked, dropped with its
        /// runtime): a flag left set would stop every later one.
        struct Done(Arc<Link>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0
                    .remade
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .1 = false;
            }
        }
        let done = Done(self.clone());
        self.runtime.spawn(async move {
            let link = &done.0;
            // A server that was only slow (a long script, a big `DEL`) still answers:
            // its connection is kept.
            if !demoted {
                let mut old = link.conn();
                let alive: Result<String, _> = ::redis::cmd("PING").query_async(&mut old).await;
                // Any answer will do (`BUSY` while a script runs past its threshold).
                if alive.as_ref().is_ok() || alive.is_err_and(|e| !unanswered(&e)) {
                    return;
                }
            }
            match ConnectionManager::new_with_config(link.client.clone(), link.config.clone()).await
            {
                Ok(conn) => {
                    tracing::info!(
                        "postbox: redis connection made again after it stopped answering"
                    );
                    *link
                        .conn
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = conn;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "postbox: redis connection could not be made again");
                }
            }
        });
    }
}

/// Whether `e` is a refusal by a node that is no longer the primary (`READONLY`,
/// `MASTERDOWN`), alone or inside a transaction refused whole (`EXECABORT`), or wrapped
/// by a script (`ERR … -READONLY …`, before Redis 7).
fn demoted(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind as S};
    // As a word of its own (a script's `ERR … -READONLY …`), not inside a key name.
    let named = |kind: Option<ErrorKind>, text: &str| {
        matches!(kind, Some(ErrorKind::Server(S::ReadOnly | S::MasterDown)))
            || text
                .split_whitespace()
                .any(|w| matches!(w.trim_start_matches('-'), "READONLY" | "MASTERDOWN"))
    };
    match e.kind() {
        ErrorKind::Server(S::ExecAbort) => e.clone().into_server_errors().is_some_and(|errs| {
            errs.iter()
                .any(|(_, s)| named(s.kind().map(ErrorKind::Server), &s.to_string()))
        }),
        kind => named(Some(kind), e.detail().unwrap_or_default()),
    }
}

/// Most batches of enqueues in flight at once.
const BATCHES_IN_FLIGHT: usize = 2;

// === impl RedisOptions ===

impl RedisOptions {
    /// Options for the queue `name` (it names the Redis keys, as their hash tag: not
    /// empty, no braces), at the URL from `POSTBOX_REDIS_URL` or else
    /// `redis://127.0.0.1:6379/`, unbounded.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            url: None,
            capacity: None,
            response_timeout: Duration::from_secs(5),
            max_message_size: 512 << 20,
        }
    }

    /// Connects to `url` (`redis://[user:password@]host:port/db`) instead.
    pub fn with_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Holds at most `capacity` live (pending and in-flight) messages; beyond that
    /// `enqueue` fails with [`QueueError::Full`]. Dead letters do not count. The check
    /// needs a Lua script per batch of enqueues, which costs Redis about twice the CPU per
    /// message of the native commands used without a capacity.
    pub fn with_capacity(mut self, capacity: u64) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// How long to wait for a reply before the call fails with
    /// [`QueueError::Unavailable`] (default 5 s).
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// The largest encoded message `enqueue` sends (default 512 MiB, Redis'
    /// `proto-max-bulk-len`): a larger one is refused with [`QueueError::Backend`].
    /// Sent, Redis would close the connection every call of this process shares (a
    /// lease's reply lost with it), and a caller retrying the enqueue would do it again.
    /// Set it to the server's `proto-max-bulk-len` if that is lower.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// The URL that will be used.
    pub fn url(&self) -> String {
        super::broker_url(self.url.as_deref(), REDIS_URL_ENV, DEFAULT_REDIS_URL)
    }
}

// === impl RedisQueue ===

/// Refuses a server whose `maxmemory-policy` may evict any key (`allkeys-*`): the
/// queue's keys have no expiry, and evicted they take acknowledged messages with them.
/// A server that does not answer `CONFIG GET` (renamed, refused by an ACL, as managed
/// services do) is taken as it is.
async fn refuse_eviction(link: &Link) -> Result<(), QueueError> {
    let reply: Result<Value, RedisError> = ::redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut link.conn())
        .await;
    let policy = match reply {
        // RESP2: `[name, value]`; RESP3: `{name: value}`.
        Ok(Value::Array(items)) => items.into_iter().nth(1),
        Ok(Value::Map(pairs)) => pairs.into_iter().next().map(|(_, v)| v),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(error = %e, "CONFIG GET maxmemory-policy not answered; eviction not checked");
            None
        }
    };
    let Some(Ok(policy)) = policy.map(string) else {
        return Ok(());
    };
    if policy.starts_with("allkeys-") {
        return Err(QueueError::Backend(
            format!(
                "the Redis server's maxmemory-policy is {policy}: once memory is full it \
                 evicts any key, and the queue's (which have no expiry) with the messages \
                 they hold; set maxmemory-policy noeviction (or a volatile-* policy)"
            )
            .into(),
        ));
    }
    Ok(())
}

impl RedisQueue {
    /// Connects and creates the stream and its consumer group if they do not exist.
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] if the server cannot be reached, [`QueueError::Backend`]
    /// for an invalid URL, credentials or database the server refuses, a server whose
    /// `maxmemory-policy` evicts any key (`allkeys-*`: see Durability in the type's
    /// docs), or when polled outside a Tokio runtime (it spawns the enqueue batching
    /// task).
    pub async fn connect(options: RedisOptions) -> Result<Self, QueueError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            QueueError::Backend(format!("RedisQueue::connect needs a Tokio runtime: {e}").into())
        })?;
        // The name is the keys' hash tag, `{name}`: an empty one, or one with a brace,
        // is no tag, and a cluster would spread the keys over slots its scripts cannot
        // span.
        let name = &options.name;
        if name.is_empty() || name.contains(['{', '}']) {
            return Err(QueueError::Backend(
                format!("invalid queue name {name:?}: not empty, and no '{{' or '}}'").into(),
            ));
        }
        let url = options.url();
        let link = Link::open(
            &url,
            &format!("redis queue {name}"),
            options.response_timeout,
        )
        .await?;
        refuse_eviction(&link).await?;
        let p = format!("postbox:{{{}}}:", options.name);
        let keys = [
            "stream", "dead", "msgs", "attempts", "nb", "keys", "leases", "delayed", "ready",
            "done", "idkeys",
        ]
        .map(|k| format!("{p}{k}"));
        let keys = Arc::new(keys);
        let batcher = options.capacity.map(|capacity| {
            let (batcher, rx) = mpsc::channel(MAX_BATCH * 4);
            runtime.spawn(batch_enqueues(link.clone(), keys.clone(), capacity, rx));
            batcher
        });
        let queue = Self {
            link,
            keys,
            capacity: options.capacity,
            max_message_size: options.max_message_size,
            batcher,
        };
        let created: Result<Value, RedisError> = ::redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&queue.keys[0])
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut queue.link.conn())
            .await;
        match created {
            Ok(_) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(queue.link.failed(e)),
        }
        Ok(queue)
    }

    /// The underlying connection (it reconnects by itself once its socket fails), for
    /// commands of your own: e.g. `WAITAOF 1 0 0` to wait for an fsync on a server with
    /// `appendfsync everysec`. Take it for each use rather than keeping it: the queue
    /// makes its connection again when a call goes unanswered, and a clone kept stays
    /// on the old one (and `WAITAOF` covers only the writes of its own connection).
    pub fn connection(&self) -> ConnectionManager {
        self.link.conn()
    }

    /// The Redis keys of this queue (see the module docs).
    pub fn keys(&self) -> &[String] {
        &self.keys[..]
    }

    /// Deletes every key of this queue: all messages, dead letters and indexes.
    ///
    /// # Errors
    /// As for any call: [`QueueError::Unavailable`] or [`QueueError::Backend`].
    pub async fn purge(&self) -> Result<(), QueueError> {
        ::redis::cmd("DEL")
            .arg(&self.keys[..])
            .query_async::<Value>(&mut self.link.conn())
            .await
            .map(drop)
            .map_err(|e| self.link.failed(e))
    }

    async fn run(&self, script: &Script, args: Vec<Vec<u8>>) -> Result<Value, QueueError> {
        invoke(&self.link, script, &self.keys, args).await
    }

    async fn enqueue_inner(&self, envelope: Envelope) -> Result<Enqueued, QueueError> {
        envelope.check_encodable()?;
        let id = envelope.id.to_string();
        let payload = envelope.encode();
        if payload.len() > self.max_message_size {
            return Err(QueueError::Backend(
                format!(
                    "an encoded message of {} bytes: the queue sends at most {} \
                     (RedisOptions::with_max_message_size)",
                    payload.len(),
                    self.max_message_size
                )
                .into(),
            ));
        }
        let created = ms_floor(envelope.created_at).to_string();
        let nb = ms_ceil(envelope.not_before).to_string();
        let attempts = envelope.attempts.to_string();
        let fields: [(&str, &[u8]); 10] = [
            ("id", id.as_bytes()),
            ("idempotency_key", envelope.idempotency_key.as_bytes()),
            ("destination", envelope.destination.as_bytes()),
            ("method", envelope.method.as_bytes()),
            ("uri", envelope.uri.as_bytes()),
            ("created_at_ms", created.as_bytes()),
            ("not_before_ms", nb.as_bytes()),
            ("attempts", attempts.as_bytes()),
            // Written with its key's claim, in one transaction: `lease` reads an entry
            // so marked whose key is not its own as a duplicate's, never as one to claim.
            ("claim", b"1"),
            ("envelope", &payload),
        ];
        match &self.batcher {
            None => {
                self.add(envelope.id, &id, &envelope.idempotency_key, fields)
                    .await
            }
            Some(batcher) => {
                let mut args: Vec<Vec<u8>> = Vec::with_capacity(3 + 2 * fields.len());
                args.push(id.clone().into());
                args.push(envelope.idempotency_key.clone().into());
                args.push((2 * fields.len()).to_string().into());
                for (k, v) in fields {
                    args.push(k.into());
                    args.push(v.to_vec());
                }
                self.add_with_capacity(batcher, args).await
            }
        }
    }

    /// Without a capacity: the `XADD`, then `HSETNX keys KEY ID`, in one `MULTI`/`EXEC`.
    /// The entry is written with its claim, so a claimed key always has its entry.
    /// (Pipelined without the transaction, about 10 % faster, a `lease` could run between
    /// the two: delete the entry as a duplicate's while the key was another message's,
    /// that message be acked, and the `HSETNX` then claim the key for a deleted entry,
    /// answering `Stored` for a lost message.) When the key is taken, `settle.lua`
    /// decides atomically: stored after all, or a duplicate whose entry it deletes
    /// (`lease.lua` deletes any such entry it reads, so it is never delivered).
    async fn add(
        &self,
        message_id: MessageId,
        id: &str,
        key: &str,
        fields: [(&str, &[u8]); 10],
    ) -> Result<Enqueued, QueueError> {
        // Sized up front: the entry is copied into the command once, without regrowth
        // (built again for a rare second try rather than cloned for every first one).
        let size =
            self.keys[0].len() + fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        let xadd = || {
            let mut xadd = ::redis::Cmd::with_capacity(3 + 2 * fields.len(), size + 8);
            xadd.arg("XADD").arg(&self.keys[0]).arg("*");
            for (k, v) in fields {
                xadd.arg(k).arg(v);
            }
            xadd
        };
        let mut conn = self.link.conn();
        if key.is_empty() {
            let _: Value = xadd()
                .query_async(&mut conn)
                .await
                .map_err(|e| self.link.failed(e))?;
            return Ok(Enqueued::Stored(message_id));
        }
        // Rarely more than once: only if `lease` deleted the entry as a duplicate's
        // while the key was taken, and the owner was acked before we looked again.
        for _ in 0..4 {
            // Each command's own answer (`ignore_errors`): an error inside the `EXEC`
            // is told apart from the transaction refused whole.
            let added: Result<Vec<Value>, _> = ::redis::pipe()
                .atomic()
                .ignore_errors()
                .add_command(xadd())
                .hset_nx(&self.keys[5], key, id)
                .query_async(&mut conn)
                .await;
            let (eid, set) = match added.map(<[Value; 2]>::try_from) {
                Ok(Ok([Value::ServerError(e), set])) => {
                    // The XADD failed inside the transaction, which is not rolled back:
                    // a claim the HSETNX made is left without its entry, so free it.
                    // (A key claimed before, by another message or by an earlier copy of
                    // this one, is left alone.)
                    if matches!(set, Value::Int(1)) {
                        let args = vec![key.as_bytes().to_vec(), id.as_bytes().to_vec()];
                        if let Err(e) = invoke(&self.link, &UNCLAIM, &self.keys, args).await {
                            tracing::warn!(error = %e, "postbox: could not free the key of a failed redis enqueue");
                        }
                    }
                    return Err(self.link.failed(e.into()));
                }
                // The entry is written, its claim not: `lease` deletes it as a
                // duplicate's (module docs).
                Ok(Ok([_, Value::ServerError(e)])) => return Err(self.link.failed(e.into())),
                Ok(Ok([eid, set])) => (bytes(eid)?, int(set)?),
                Ok(Err(_)) => return Err(unexpected("enqueue reply")),
                // Refused whole (`EXECABORT`: an error while queueing, such as OOM) or
                // not answered (a timeout, a dropped connection): the transaction ran
                // whole or not at all, so a claim made has its entry. Freeing the key
                // could free a stored copy's (this enqueue retried after a lost reply),
                // and `lease` would delete that entry as nobody's.
                Err(e) => return Err(self.link.failed(e)),
            };
            if set == 1 {
                return Ok(Enqueued::Stored(message_id));
            }
            let args = vec![key.as_bytes().to_vec(), id.as_bytes().to_vec(), eid];
            let settled = invoke(&self.link, &SETTLE, &self.keys, args).await?;
            let [code, owner] =
                <[Value; 2]>::try_from(array(settled)?).map_err(|_| unexpected("settle reply"))?;
            match int(code)? {
                1 => return Ok(Enqueued::Stored(message_id)),
                0 => return Ok(Enqueued::Duplicate(parse_id(&string(owner)?)?)),
                _ => continue,
            }
        }
        Err(QueueError::Backend(
            "redis enqueue: the entry kept being deleted as a duplicate's".into(),
        ))
    }

    /// With a capacity: through the batching task, one `enqueue.lua` call per batch (it
    /// checks the length first).
    async fn add_with_capacity(
        &self,
        batcher: &mpsc::Sender<Pending>,
        args: Vec<Vec<u8>>,
    ) -> Result<Enqueued, QueueError> {
        let (reply, answer) = oneshot::channel();
        let gone = || QueueError::Backend("redis enqueue batcher stopped".into());
        batcher
            .send(Pending { args, reply })
            .await
            .map_err(|_| gone())?;
        let (code, id) = match answer.await.map_err(|_| gone())? {
            Ok(v) => v,
            Err((true, msg)) => return Err(QueueError::Unavailable(msg.into())),
            Err((false, msg)) => return Err(QueueError::Backend(msg.into())),
        };
        match code {
            1 => Ok(Enqueued::Stored(parse_id(&id)?)),
            0 => Ok(Enqueued::Duplicate(parse_id(&id)?)),
            _ => Err(QueueError::Full {
                capacity: self.capacity.unwrap_or(0),
            }),
        }
    }

    async fn lease_inner(
        &self,
        max: usize,
        lease_for: Duration,
        now: SystemTime,
    ) -> Result<Vec<Leased>, QueueError> {
        let lease_until = super::saturating_add(now, lease_for);
        let args = vec![
            CONSUMER.into(),
            ms_floor(now).to_string().into(),
            ms_ceil(lease_until).to_string().into(),
            // Lua numbers are doubles: a `max` near `usize::MAX` would reach Redis as
            // `1.8e+19`, which `ZRANGE` refuses.
            max.min(MAX_LEASE).to_string().into(),
        ];
        let reply = self.run(&LEASE, args).await?;
        let [foreign, items] =
            <[Value; 2]>::try_from(array(reply)?).map_err(|_| unexpected("lease reply"))?;
        let foreign = int(foreign)?;
        if foreign > 0 {
            tracing::error!(queue = %self.keys[0], entries = foreign, "postbox: stream entries not written by postbox moved to the dead-letter stream");
            metrics::counter!("postbox_queue_quarantined_total").increment(foreign.unsigned_abs());
        }
        let mut out = Vec::new();
        for item in array(items)? {
            let [id, attempts, env, nb] =
                <[Value; 4]>::try_from(array(item)?).map_err(|_| unexpected("lease reply"))?;
            let id = parse_id(&string(id)?)?;
            let attempts = int(attempts)?;
            let token = LeaseToken {
                id,
                generation: u64::try_from(attempts).unwrap_or(0),
            };
            let mut envelope = match Envelope::decode(&bytes(env)?) {
                Ok(envelope) => envelope,
                Err(e) => {
                    // Never deliverable: out of the way, into the dead-letter stream with
                    // its fields as they are, so the rest of the batch is still leased.
                    self.set_aside(token, &e.to_string()).await;
                    continue;
                }
            };
            // The generation's low half is the attempts, its high half the releases.
            envelope.attempts = (attempts & 0xffff_ffff) as u32;
            let nb = string(nb)?;
            if !nb.is_empty() {
                envelope.not_before = from_ms(&nb)?;
            }
            out.push(Leased {
                envelope,
                token,
                lease_until,
            });
        }
        Ok(out)
    }

    /// Dead-letters the leased message `token` whose envelope cannot be decoded, logged
    /// at error level and counted in `postbox_queue_quarantined_total`. If that fails,
    /// its lease expires and a later `lease` tries again.
    async fn set_aside(&self, token: LeaseToken, why: &str) {
        // Counted (and logged at error level) once it is moved: a move that failed
        // comes back with the next lease, and would be counted again.
        match self.dead_inner(token, &format!("undecodable: {why}")).await {
            Ok(()) => {
                tracing::error!(id = %token.id, reason = why, "postbox: undecodable queued message moved to the dead-letter stream");
                metrics::counter!("postbox_queue_quarantined_total").increment(1);
            }
            Err(e) => {
                tracing::warn!(id = %token.id, reason = why, error = %e, "postbox: could not dead-letter an undecodable message");
            }
        }
    }

    async fn ack_inner(&self, tokens: &[LeaseToken]) -> Result<(), QueueError> {
        if tokens.is_empty() {
            return Ok(());
        }
        let mut args = Vec::with_capacity(tokens.len() * 2);
        for t in tokens {
            args.push(t.id.to_string().into_bytes());
            args.push(t.generation.to_string().into_bytes());
        }
        let lost = int(self.run(&ACK, args).await?)?;
        match usize::try_from(lost) {
            Ok(0) => Ok(()),
            Ok(i) if i <= tokens.len() => Err(QueueError::LeaseLost(tokens[i - 1])),
            _ => Err(unexpected("ack reply")),
        }
    }

    async fn retry_inner(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
        counted: bool,
    ) -> Result<(), QueueError> {
        let args = vec![
            token.id.to_string().into(),
            token.generation.to_string().into(),
            ms_ceil(not_before).to_string().into(),
            if counted { "0" } else { "1" }.into(),
        ];
        match int(self.run(&RETRY, args).await?)? {
            1 => Ok(()),
            _ => Err(QueueError::LeaseLost(token)),
        }
    }

    async fn dead_inner(&self, token: LeaseToken, reason: &str) -> Result<(), QueueError> {
        let args = vec![
            token.id.to_string().into(),
            token.generation.to_string().into(),
            reason.as_bytes().to_vec(),
            ms_floor(SystemTime::now()).to_string().into(),
        ];
        match int(self.run(&DEAD, args).await?)? {
            1 => Ok(()),
            _ => Err(QueueError::LeaseLost(token)),
        }
    }

    async fn depth_inner(&self) -> Result<Depth, QueueError> {
        let (live, in_flight, dead): (u64, u64, u64) = ::redis::pipe()
            .atomic()
            .xlen(&self.keys[0])
            .zcard(&self.keys[6])
            .xlen(&self.keys[1])
            .query_async(&mut self.link.conn())
            .await
            .map_err(|e| self.link.failed(e))?;
        Ok(Depth {
            pending: live.saturating_sub(in_flight),
            in_flight,
            dead,
        })
    }

    /// Scans the dead-letter stream oldest first, a page at a time, for entries whose
    /// `id` field is one of `ids`, and deletes them (`XDEL` of entries already read is
    /// safe against a concurrent delete: it counts only what it deleted).
    ///
    /// An id deletes as many entries as it is listed in `ids`, the oldest first (see
    /// `WantedIds`).
    async fn discard_dead_inner(&self, ids: &[MessageId]) -> Result<u64, QueueError> {
        const PAGE: usize = 256;
        let mut wanted = super::WantedIds::new(ids.iter().map(MessageId::to_string));
        let mut conn = self.link.conn();
        let mut start = "-".to_owned();
        let mut discarded = 0;
        while !wanted.is_empty() {
            let reply: Value = ::redis::cmd("XRANGE")
                .arg(&self.keys[1])
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.link.failed(e))?;
            let page = array(reply)?;
            let full = page.len() == PAGE;
            let mut found = Vec::new();
            for entry in page {
                let [eid, fields] =
                    <[Value; 2]>::try_from(array(entry)?).map_err(|_| unexpected("dead entry"))?;
                let eid = string(eid)?;
                let mut fields = array(fields)?.into_iter();
                while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
                    if string(k).is_ok_and(|k| k == "id")
                        && string(v).is_ok_and(|v| wanted.take(v.as_str()))
                    {
                        found.push(eid.clone());
                        break;
                    }
                }
                // Exclusive start of the next page.
                start = format!("({eid}");
            }
            if !found.is_empty() {
                let n: u64 = ::redis::cmd("XDEL")
                    .arg(&self.keys[1])
                    .arg(&found)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.link.failed(e))?;
                discarded += n;
            }
            if !full {
                break;
            }
        }
        Ok(discarded)
    }

    async fn dead_letters_inner(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        // Paged: skipped entries do not count, so `max` undecodable ones at the head
        // cannot hide the rest (a redrive would move nothing, for good).
        let mut from = "-".to_owned();
        while out.len() < max {
            // A page at most: Redis refuses a `COUNT` above `i64::MAX` (a "read them
            // all" `usize::MAX` failed).
            let want = (max - out.len()).min(4096);
            let reply: Value = ::redis::cmd("XRANGE")
                .arg(&self.keys[1])
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(want)
                .query_async(&mut self.link.conn())
                .await
                .map_err(|e| self.link.failed(e))?;
            let page = array(reply)?;
            let last_page = page.len() < want;
            for entry in page {
                let [eid, fields] =
                    <[Value; 2]>::try_from(array(entry)?).map_err(|_| unexpected("dead entry"))?;
                from = format!("({}", string(eid)?);
                if let Some(letter) = self.dead_letter_of(fields)? {
                    out.push(letter);
                }
            }
            if last_page {
                break;
            }
        }
        Ok(out)
    }

    /// The dead letter of a dead-stream entry's `fields`, or `None` if it cannot be
    /// decoded (skipped and logged).
    fn dead_letter_of(&self, fields: Value) -> Result<Option<DeadLetter>, QueueError> {
        let mut envelope = None;
        let (mut reason, mut attempts, mut nb) = (String::new(), None, None);
        let mut fields = array(fields)?.into_iter();
        while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
            // A field name that is not UTF-8 (a foreign entry) is none of ours: it
            // must not fail the whole listing.
            match string(k).unwrap_or_default().as_str() {
                "envelope" => envelope = Some(Envelope::decode(&bytes(v)?)),
                "reason" => reason = String::from_utf8_lossy(&bytes(v)?).into_owned(),
                // Tolerant: a foreign entry set aside by `lease` may hold anything.
                "attempts" => attempts = string(v).ok().and_then(|a| a.parse::<u32>().ok()),
                "not_before_ms" => nb = string(v).ok().and_then(|t| from_ms(&t).ok()),
                _ => {}
            }
        }
        // An undecodable one (set aside by `lease`, see `set_aside`) is skipped: it
        // stays in the stream for a plain client to inspect.
        let mut envelope = match envelope {
            Some(Ok(envelope)) => envelope,
            Some(Err(e)) => {
                tracing::warn!(queue = %self.keys[1], error = %e, "postbox: undecodable dead letter skipped");
                return Ok(None);
            }
            None => {
                tracing::warn!(queue = %self.keys[1], "postbox: dead letter without an envelope skipped");
                return Ok(None);
            }
        };
        if let Some(a) = attempts {
            envelope.attempts = a;
        }
        if let Some(nb) = nb {
            // The field is the envelope's own not-before rounded up to a millisecond,
            // unless `retry_later` moved it.
            if ms_ceil(envelope.not_before) != ms_ceil(nb) {
                envelope.not_before = nb;
            }
        }
        Ok(Some(DeadLetter { envelope, reason }))
    }
}

impl fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisQueue")
            .field("stream", &self.keys[0])
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Queue for RedisQueue {
    fn enqueue(
        &self,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Enqueued, QueueError>> + Send {
        self.enqueue_inner(envelope)
    }

    fn lease(
        &self,
        max: usize,
        lease_for: Duration,
        now: SystemTime,
    ) -> impl Future<Output = Result<Vec<Leased>, QueueError>> + Send {
        self.lease_inner(max, lease_for, now)
    }

    fn ack(&self, tokens: &[LeaseToken]) -> impl Future<Output = Result<(), QueueError>> + Send {
        self.ack_inner(tokens)
    }

    fn retry_later(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        self.retry_inner(token, not_before, true)
    }

    fn release(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        self.retry_inner(token, not_before, false)
    }

    fn dead_letter(
        &self,
        token: LeaseToken,
        reason: &str,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        self.dead_inner(token, reason)
    }

    fn depth(&self) -> impl Future<Output = Result<Depth, QueueError>> + Send {
        self.depth_inner()
    }

    fn dead_letters(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, QueueError>> + Send {
        self.dead_letters_inner(max)
    }

    fn discard_dead_letters(
        &self,
        ids: &[MessageId],
    ) -> impl Future<Output = Result<u64, QueueError>> + Send {
        self.discard_dead_inner(ids)
    }
}

// === group commit ===

/// With a capacity: sends every enqueue waiting at the time in one `enqueue.lua` call (up
/// to [`MAX_BATCH`], with up to [`BATCHES_IN_FLIGHT`] calls at once), then answers each.
/// Ends when the last [`RedisQueue`] clone is dropped.
async fn batch_enqueues(
    link: Arc<Link>,
    keys: Arc<[String; 11]>,
    capacity: u64,
    mut rx: mpsc::Receiver<Pending>,
) {
    // A few batches in flight at once, so Redis works while the client prepares the next.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let mut args = vec![capacity.to_string().into_bytes()];
        for p in &mut batch {
            args.append(&mut p.args);
        }
        let link = link.clone();
        let keys = keys.clone();
        tokio::spawn(async move {
            let result = match invoke(&link, &ENQUEUE, &keys, args).await {
                Ok(v) => parse_batch(v, batch.len()).map_err(|e| (false, e.to_string())),
                Err(e) => Err((matches!(e, QueueError::Unavailable(_)), e.to_string())),
            };
            drop(permit);
            answer(batch, result);
        });
    }
}

/// Runs `script` with the queue's keys, the group name and `args`.
async fn invoke(
    link: &Arc<Link>,
    script: &Script,
    keys: &[String; 11],
    args: Vec<Vec<u8>>,
) -> Result<Value, QueueError> {
    let mut inv = script.prepare_invoke();
    for k in keys {
        inv.key(k);
    }
    inv.arg(GROUP);
    for a in args {
        inv.arg(a);
    }
    inv.invoke_async(&mut link.conn())
        .await
        .map_err(|e| link.failed(e))
}

fn answer(batch: Vec<Pending>, result: Result<Vec<(i64, String)>, (bool, String)>) {
    match result {
        Ok(answers) => {
            for (p, a) in batch.into_iter().zip(answers) {
                let _ = p.reply.send(Ok(a));
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

fn parse_batch(v: Value, n: usize) -> Result<Vec<(i64, String)>, QueueError> {
    let items = array(v)?;
    if items.len() != n {
        return Err(unexpected("enqueue reply length"));
    }
    items
        .into_iter()
        .map(|item| match <[Value; 2]>::try_from(array(item)?) {
            Ok([code, id]) => Ok((int(code)?, string(id)?)),
            Err(_) => Err(unexpected("enqueue reply")),
        })
        .collect()
}

// === helpers ===

/// Connection problems, and a server that cannot answer for now (loading its data after
/// a restart, a script running too long, a failover under way), are
/// [`QueueError::Unavailable`]: the caller may try again. The rest is a backend error.
fn map_err(e: RedisError) -> QueueError {
    use redis::{ErrorKind, ServerErrorKind as S};
    let transient = match e.kind() {
        // A transaction refused whole, while its commands were queued: as their errors say.
        ErrorKind::Server(S::ExecAbort) => e.clone().into_server_errors().is_some_and(|errs| {
            errs.iter()
                .any(|(_, s)| transient(s.kind().map(ErrorKind::Server), Some(s.code())))
        }),
        kind => transient(Some(kind), e.code()) || refused_in_a_script(&e),
    };
    if transient || unanswered(&e) || demoted(&e) {
        QueueError::Unavailable(Box::new(e))
    } else {
        QueueError::Backend(Box::new(e))
    }
}

/// Whether a server error of this kind or code means "not now": loading, read-only
/// after a failover, out of memory …
fn transient(kind: Option<redis::ErrorKind>, code: Option<&str>) -> bool {
    use redis::{ErrorKind, ServerErrorKind as S};
    matches!(
        kind,
        Some(ErrorKind::Server(
            S::BusyLoading | S::TryAgain | S::MasterDown | S::ClusterDown | S::ReadOnly
        ))
    ) || matches!(
        code,
        // Out of memory (`maxmemory` with `noeviction`), too few replicas answered, or
        // writes stopped after a failed save (`stop-writes-on-bgsave-error`, a failed
        // append-only write): refused for now, as a full disk is for the embedded queue.
        Some("BUSY" | "OOM" | "NOREPLICAS" | "MISCONF")
    )
}

/// A refusal for now that reached a script's `redis.call` and came back inside the
/// script's error (Redis 6.2: `ERR Error running script …: -OOM …`): as a word of its
/// own, with its `-`, not inside a key name.
fn refused_in_a_script(e: &RedisError) -> bool {
    e.detail().unwrap_or_default().split_whitespace().any(|w| {
        w.strip_prefix('-').is_some_and(|code| {
            transient(
                None,
                Some(code.trim_end_matches(|c: char| !c.is_ascii_uppercase())),
            )
        })
    })
}

/// No answer came from Redis (a timeout, a dropped or refused connection): whatever was
/// sent may or may not have run.
fn unanswered(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

fn unexpected(what: &str) -> QueueError {
    QueueError::Backend(format!("unexpected redis {what}").into())
}

fn array(v: Value) -> Result<Vec<Value>, QueueError> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        _ => Err(unexpected("reply type")),
    }
}

fn int(v: Value) -> Result<i64, QueueError> {
    match v {
        Value::Int(i) => Ok(i),
        Value::BulkString(b) => std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| unexpected("integer")),
        _ => Err(unexpected("integer")),
    }
}

fn bytes(v: Value) -> Result<Vec<u8>, QueueError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        _ => Err(unexpected("string")),
    }
}

fn string(v: Value) -> Result<String, QueueError> {
    String::from_utf8(bytes(v)?).map_err(|_| unexpected("utf-8 string"))
}

fn parse_id(s: &str) -> Result<MessageId, QueueError> {
    s.parse()
        .map_err(|_| QueueError::Corrupt(format!("bad message id {s:?}")))
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
}

fn ms_floor(t: SystemTime) -> u64 {
    u64::try_from(since_epoch(t).as_millis()).unwrap_or(u64::MAX)
}

/// Rounded up, so nothing is delivered before its time.
fn ms_ceil(t: SystemTime) -> u64 {
    let d = since_epoch(t);
    let ms = ms_floor(t);
    if d.subsec_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms.saturating_add(1)
    }
}

fn from_ms(s: &str) -> Result<SystemTime, QueueError> {
    let ms: u64 = s
        .parse()
        .map_err(|_| QueueError::Corrupt(format!("bad time {s:?}")))?;
    Ok(super::saturating_add(
        SystemTime::UNIX_EPOCH,
        Duration::from_millis(ms),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::DeferReason;

    /// The error a server's `reply` (RESP text) stands for.
    fn error(reply: &[u8]) -> RedisError {
        ::redis::parse_redis_value(reply)
            .unwrap()
            .extract_error()
            .unwrap_err()
    }

    /// A server out of memory (or short of replicas) refuses for now: `Unavailable`,
    /// as a full disk is for the embedded queue; a script error is a backend error.
    #[test]
    fn out_of_memory_is_unavailable() {
        for reply in [
            &b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"[..],
            b"-NOREPLICAS Not enough good replicas to write.\r\n",
        ] {
            let e = map_err(error(reply));
            assert!(matches!(e, QueueError::Unavailable(_)), "{e:?}");
        }
        let e = map_err(error(b"-ERR user_script:1: boom\r\n"));
        assert!(matches!(e, QueueError::Backend(_)), "{e:?}");
    }

    /// Writes stopped after a failed save (`MISCONF`), and a refusal for now that came
    /// back inside a script's error (Redis 6.2), are `Unavailable` too: a caller (the
    /// replayer's ack) tries them again. They were backend errors, given up. A key
    /// named like a code inside a script's error is not one.
    #[test]
    fn a_refusal_for_now_in_a_script_or_after_a_failed_save_is_unavailable() {
        for reply in [
            &b"-MISCONF Errors writing to the AOF file: No space left on device\r\n"[..],
            b"-ERR Error running script (call to f_1): @user_script:3: -OOM command not allowed when used memory > 'maxmemory'.\r\n",
            b"-ERR Error running script: @user_script:3: @user_script: 3: -MISCONF Errors writing to the AOF file\r\n",
        ] {
            let e = map_err(error(reply));
            assert!(matches!(e, QueueError::Unavailable(_)), "{e:?}");
        }
        let e = map_err(error(b"-ERR user_script:1: no key postbox:OOM here\r\n"));
        assert!(matches!(e, QueueError::Backend(_)), "{e:?}");
    }

    /// A name that is no hash tag is refused before connecting.
    #[tokio::test]
    async fn a_name_that_is_no_hash_tag_is_refused() {
        for name in ["", "a}b", "{a"] {
            let e = RedisQueue::connect(RedisOptions::new(name))
                .await
                .unwrap_err();
            assert!(e.to_string().contains("invalid queue name"), "{e}");
        }
    }

    #[test]
    fn a_server_that_cannot_answer_for_now_is_unavailable_not_a_backend_error() {
        use ::redis::{ErrorKind, ServerErrorKind as S};
        for kind in [
            S::BusyLoading,
            S::TryAgain,
            S::MasterDown,
            S::ClusterDown,
            S::ReadOnly,
        ] {
            let e = RedisError::from((ErrorKind::Server(kind), "for now"));
            assert!(matches!(map_err(e), QueueError::Unavailable(_)), "{kind:?}");
        }
        let e = RedisError::from((ErrorKind::Server(S::ResponseError), "bad"));
        assert!(matches!(map_err(e), QueueError::Backend(_)));
    }

    async fn entry(q: &RedisQueue, id: MessageId, key: &str) -> Vec<u8> {
        ::redis::cmd("XADD")
            .arg(&q.keys[0])
            .arg("*")
            .arg("id")
            .arg(id.to_string())
            .arg("idempotency_key")
            .arg(key)
            .query_async(&mut q.connection())
            .await
            .unwrap()
    }

    async fn settle(q: &RedisQueue, key: &str, id: MessageId, eid: Vec<u8>) -> (i64, String) {
        let args = vec![key.into(), id.to_string().into(), eid];
        let reply = q.run(&SETTLE, args).await.unwrap();
        let [code, owner] = <[Value; 2]>::try_from(array(reply).unwrap()).unwrap();
        (int(code).unwrap(), string(owner).unwrap())
    }

    async fn owner(q: &RedisQueue, key: &str) -> Option<String> {
        ::redis::cmd("HGET")
            .arg(&q.keys[5])
            .arg(key)
            .query_async(&mut q.connection())
            .await
            .unwrap()
    }

    /// Each answer `settle.lua` gives an enqueue whose `HSETNX` found the key taken.
    /// Needs Redis on 127.0.0.1:6379 (or `POSTBOX_REDIS_URL`); fails if it is down.
    #[tokio::test]
    async fn settle_answers_duplicate_stored_or_add_again() {
        let name = format!("unit-settle-{}", MessageId::new_v7());
        let q = RedisQueue::connect(RedisOptions::new(name))
            .await
            .expect("Redis must answer on 127.0.0.1:6379 (see shared/services.md)");
        let mut first = Envelope::new("d", "POST", "/", "{}", DeferReason::CircuitOpen);
        first.idempotency_key = "k".into();
        let a = q.enqueue(first).await.unwrap().id();

        // The key is taken: a duplicate, whose entry is deleted.
        let b = MessageId::new_v7();
        let eid = entry(&q, b, "k").await;
        assert_eq!(settle(&q, "k", b, eid).await, (0, a.to_string()));

        // `lease` deleted the entry while the key was taken, then the owner was acked:
        // the entry is gone, so the enqueue must add it again (never answer "stored").
        let c = MessageId::new_v7();
        let eid = entry(&q, c, "k").await;
        // A second ahead: not-before is stored rounded up to the millisecond, and all
        // of this can run within the millisecond the owner was enqueued in.
        let now = SystemTime::now() + Duration::from_secs(1);
        let leased = q.lease(10, Duration::from_secs(30), now).await;
        let leased = leased.unwrap();
        assert_eq!(leased.len(), 1, "only the owner is delivered");
        q.ack(&[leased[0].token]).await.unwrap();
        assert_eq!(settle(&q, "k", c, eid).await.0, 2);
        assert_eq!(owner(&q, "k").await, None);

        // The owner was acked and the entry is still there: stored after all.
        let d = MessageId::new_v7();
        let eid = entry(&q, d, "k").await;
        assert_eq!(settle(&q, "k", d, eid).await, (1, d.to_string()));
        assert_eq!(owner(&q, "k").await, Some(d.to_string()));
        q.purge().await.unwrap();
    }
}
