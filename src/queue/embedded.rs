//! [`EmbeddedQueue`]: the durable default — a redb database written by one
//! group-commit thread.
//!
//! # Example
//! ```
//! use postbox::queue::{DeferReason, EmbeddedOptions, EmbeddedQueue, Envelope, Queue};
//! use std::time::{Duration, SystemTime};
//!
//! # let dir = tempfile::tempdir().unwrap();
//! # tokio_test::block_on(async {
//! let queue = EmbeddedQueue::open(dir.path().join("postbox.redb"), EmbeddedOptions::new())?;
//! let env = Envelope::new("api:443", "POST", "https://api/orders", "{}", DeferReason::CircuitOpen);
//! let receipt = queue.enqueue(env).await?; // fsynced when this returns
//! let leased = queue.lease(64, Duration::from_secs(30), SystemTime::now()).await?;
//! queue.ack(&[leased[0].token]).await?;
//! queue.close().await?;
//! # Ok::<_, postbox::queue::QueueError>(()) }).unwrap();
//! ```
//!
//! # Design
//!
//! Every operation — enqueue, lease, ack, retry, dead-letter, and the reads — is sent to
//! one writer thread. The thread takes *everything* waiting (up to
//! [`EmbeddedOptions::with_max_batch`]), applies it in **one** redb write transaction —
//! taking into the same transaction whatever arrives while it applies — and commits it
//! with `Durability::Immediate` (one `fdatasync`), then answers every caller.
//! Concurrent enqueues thus share a commit: throughput grows with the number of producers
//! instead of collapsing to one fsync per message. (Taking late arrivals matters: without
//! it, 64 producers settle into two groups of 32 that take turns, each waiting out the
//! other's fsync; with it they share commits of about 60.)
//!
//! Tables, all updated in the same atomic transaction:
//!
//! | table | key → value | holds |
//! |---|---|---|
//! | `messages` | id → encoded [`Envelope`] | every stored message (pending, in flight, dead) |
//! | `scheduled` | (not_before ns, id) → attempts | pending, maybe not yet due |
//! | `ready` | id → attempts | due: pending or in flight, in FIFO (id) order |
//! | `dead` | id → reason | dead letters |
//! | `idempotency_keys` | key → id | keys of pending and in-flight messages |
//! | `postbox_meta` | name → u64 | the schema version |
//!
//! Ids are stored as `u128` (the UUID's bytes read big-endian, so the order is the
//! same). The attempt count travels with the message's index entry, so a lease or an ack
//! never rewrites the stored envelope; the envelope's own `attempts` field is brought up
//! to date when it is rewritten anyway (retry later, dead letter).
//!
//! **Leases live in the writer thread's memory, not in the file.** A leased message
//! stays in `ready`; the writer knows which ready ids are in flight (and until when),
//! and a lease skips them with a cursor: every ready id above the cursor is free, and
//! the free ones at or below it (expired leases, late or rescheduled arrivals) are kept
//! in a small ordered set. A lease thus reads the index and the envelope and rewrites
//! one small index entry; an ack removes three entries (`ready`, `messages`, the key).
//! A batch of acks is sorted and removed with one ordered pass (`retain_in`) over each
//! of `ready` and `messages` per run of ids created close together, instead of one
//! descent per message: about 3× cheaper per acked message. After a crash or a reopen
//! every message that was in flight is simply pending again — what a lost or expired
//! lease means anyway — and opening needs no recovery.
//! A lease writes only its attempt count (the `ready` entry's value), so a reopen, or a
//! crash after the next sync, does not forget it: a message that kills its consumer
//! still reaches the dead-letter queue after its maximum attempts.
//!
//! An enqueue that is already due by the system clock goes straight to `ready`, otherwise
//! to `scheduled`. A lease first frees expired leases, then moves due `scheduled` entries
//! to `ready`, then takes the lowest free ids (checking each one's `not_before` against
//! the lease's `now`) — so it costs O(log n) per message, however many are waiting.
//! Times are stored as nanoseconds since the Unix epoch.
//!
//! # Durability and damage
//!
//! Every commit that stores, reschedules or dead-letters a message is
//! `Durability::Immediate`: redb writes the pages, then `fdatasync`s before the commit
//! returns, so an acknowledged enqueue survives a process crash and — as far as the disk
//! honours flushes — power loss. The tests kill a process with SIGKILL while 64 tasks
//! enqueue and find every acknowledged message after reopening; power loss itself is not
//! simulated. A read-only batch (depth, an empty lease) costs no commit.
//!
//! A batch of nothing but leases and acks commits with `Durability::None` (no fsync);
//! the writer makes it durable with the next durable commit or, at the latest, when
//! [`ack_sync`](EmbeddedOptions::with_ack_sync) (100 ms by default) has passed since the
//! oldest such commit — on the next batch or, when idle, with an empty durable commit —
//! and when the queue is closed. Losing a lease in a crash is the same as the lease
//! expiring: the message is pending again (the lease's attempt may go uncounted).
//! Except for a *redelivery*, whose lease is committed durably: a message leased before
//! (its attempts above zero: an expired lease, a retry) or stored before the queue was
//! opened (which a process that died may have leased, uncounted). So a message that
//! kills its consumer within `ack_sync` of its lease is counted from the first restart
//! on, and reaches the dead letters instead of crashing every restart forever.
//! Losing an ack in a crash delivers the message once more, which at-least-once delivery
//! allows and the idempotency key makes harmless. No message is ever lost this way: only
//! enqueues promise durability on return, and they always get it. This takes the fsync
//! out of a drain, which alternates leases and acks (the bound also keeps redb reusing
//! freed pages, which it does only after a durable commit).
//!
//! A failed commit (a full disk, a failed fsync) fails the operations of its batch with
//! that error; redb then refuses every write, so the writer opens the file again before
//! the next operation. What was committed durably is there, and the leases consumers
//! hold are kept (a lease the failed batch made is not: its caller got the error), so a
//! message in flight is not delivered a second time while its consumer works on it.
//!
//! Opening checks the file: not a redb file, a truncated file, damaged pages (with the
//! default integrity check) or an unknown schema version are [`QueueError::Corrupt`],
//! never a panic. An *empty* file is taken as a new queue (redb's rule: a crash during
//! the very first open leaves one). Two limits come from redb's commit, which keeps
//! the previous commit's root: damage to pages only the newest commit wrote (a disk
//! that dropped its writes, then a crash) is rolled back to the commit before, losing
//! that batch silently rather than reporting `Corrupt`; and after a failed fsync the
//! file is opened again in place, trusting what the operating system's cache says was
//! written (the kernel may have marked those pages clean). A disk that fails its
//! fsyncs is not one a queue can be durable on.
//!
//! A stored message that cannot be decoded (damaged inside intact pages, or written by a
//! newer envelope version) is *quarantined* when a lease reaches it: taken out of the
//! queue and its key index, its id and the reason kept in the `quarantine` table and its
//! bytes left in `messages`, logged at error level (with its id) and counted in
//! `postbox_queue_quarantined_total`, so the leases after it go on. It counts among the
//! dead letters of [`Queue::depth`] (as a broker's undecodable dead letter does), is not
//! listed by [`Queue::dead_letters`] (there is no envelope to list), and
//! [`Queue::discard_dead_letters`] deletes it by its id. A release that can decode it
//! (the newer one again, after a rollback) lists it among the dead letters, with its
//! quarantine reason, after the others: [`Queue::redrive_dead_letters`] brings it back.

use super::{
    DeadLetter, Depth, Enqueued, Envelope, LeaseToken, Leased, MessageId, Queue, QueueError,
};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::ops::Bound;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use tokio::time::Instant;

type Id = u128;

fn to_id(id: MessageId) -> Id {
    u128::from_be_bytes(id.0)
}

fn from_id(id: Id) -> MessageId {
    MessageId(id.to_be_bytes())
}

const META: TableDefinition<'_, &str, u64> = TableDefinition::new("postbox_meta");
const MESSAGES: TableDefinition<'_, Id, &[u8]> = TableDefinition::new("messages");
const SCHEDULED: TableDefinition<'_, (u64, Id), u32> = TableDefinition::new("scheduled");
const READY: TableDefinition<'_, Id, u32> = TableDefinition::new("ready");
/// Schema 1 only: leases were stored; opening a version 1 file moves them back to ready.
const V1_IN_FLIGHT: TableDefinition<'_, Id, (u64, u32)> = TableDefinition::new("in_flight");
const V1_EXPIRY: TableDefinition<'_, (u64, Id), ()> = TableDefinition::new("lease_expiry");
const DEAD: TableDefinition<'_, Id, &str> = TableDefinition::new("dead");
const KEYS: TableDefinition<'_, &str, Id> = TableDefinition::new("idempotency_keys");
/// Messages that could not be decoded when leased: id → why. Their bytes stay in
/// `messages`; nothing reads them again.
const QUARANTINE: TableDefinition<'_, Id, &str> = TableDefinition::new("quarantine");

/// The quarantine reason of an id indexed whose bytes were missing.
const NOT_STORED: &str = "indexed but not stored";

/// The layout version of the tables above (2: leases in memory).
const SCHEMA_VERSION: u64 = 2;

/// Options of an [`EmbeddedQueue`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    capacity: Option<u64>,
    max_batch: usize,
    check_integrity: bool,
    cache_size: Option<usize>,
    ack_sync: Duration,
    /// Room for operations waiting for the writer, in [`Gate::UNIT`]s.
    backlog_units: u32,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl EmbeddedOptions {
    /// Defaults: unbounded, batches of up to 4096 operations per commit, integrity check
    /// on open, redb's default cache, acks durable within 100 ms, a write backlog of
    /// 64 MiB.
    pub fn new() -> Self {
        Self {
            capacity: None,
            max_batch: 4096,
            check_integrity: true,
            cache_size: None,
            ack_sync: Duration::from_millis(100),
            backlog_units: Gate::units(64 << 20),
        }
    }

    /// How much may wait for the writer thread, in bytes of operations (an enqueue
    /// counts its encoded envelope, any other operation 4 KiB): beyond it, operations
    /// wait for room before they are sent, so producers faster than the disk are slowed
    /// down instead of growing the process's memory (with callers that give up, e.g. on
    /// a timeout, without bound). One operation larger than the whole backlog waits for
    /// it to be empty. Default 64 MiB; at least 4 KiB.
    pub fn with_write_backlog(mut self, bytes: usize) -> Self {
        self.backlog_units = Gate::units(bytes);
        self
    }

    /// How long an ack (or a lease) may stay unsynced: batches of nothing but leases,
    /// acks and reads commit without an fsync, and the writer makes them durable with
    /// the next durable commit or at the latest after `interval` (module docs). A crash
    /// in between delivers those messages again; none is lost. `Duration::ZERO` makes
    /// every batch holding an ack durable before the ack returns.
    pub fn with_ack_sync(mut self, interval: Duration) -> Self {
        self.ack_sync = interval;
        self
    }

    /// Holds at most `capacity` live (pending and in-flight) messages; beyond that
    /// enqueue fails with [`QueueError::Full`]. Dead letters do not count.
    pub fn with_capacity(mut self, capacity: u64) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// At most `max` operations share one commit (at least 1). Larger batches amortize
    /// the fsync over more messages; smaller ones bound the latency of the batch.
    pub fn with_max_batch(mut self, max: usize) -> Self {
        self.max_batch = max.max(1);
        self
    }

    /// Whether open verifies every page's checksum (redb's `check_integrity`), so a file
    /// damaged outside redb is refused with [`QueueError::Corrupt`] instead of trusted.
    /// On by default; it reads the whole file once at open.
    pub fn with_integrity_check(mut self, enabled: bool) -> Self {
        self.check_integrity = enabled;
        self
    }

    /// redb's page cache size in bytes.
    pub fn with_cache_size(mut self, bytes: usize) -> Self {
        self.cache_size = Some(bytes);
        self
    }
}

/// The embedded durable queue: a redb (≥ 4.0) file written by a group-commit thread.
///
/// [`enqueue`](Queue::enqueue) returns only once the message is committed with
/// `Durability::Immediate` — fsynced, so it survives a process crash or power loss.
/// Concurrent operations share one commit; acks and leases are made durable within
/// [`ack_sync`](EmbeddedOptions::with_ack_sync) (see the module docs).
///
/// Dropping the last handle stops the writer thread after the operations already sent
/// (and joins it); [`close`](Self::close) does the same and reports errors. The join
/// blocks the dropping thread while the writer applies what is still waiting (a backlog
/// of enqueues, one fsync per batch, then the last sync): in async code, end with
/// `close().await`, which waits without blocking, rather than a drop on a runtime
/// thread.
///
/// # Clone
///
/// Clones are handles to the same queue and writer thread.
///
/// # Cancel safety
///
/// Dropping an operation's future after it was sent does not withdraw it: an enqueue
/// may still be stored (and its id is then lost to the caller, though the idempotency
/// key still de-duplicates a second try); a lease may still be taken and then expires.
#[derive(Clone)]
pub struct EmbeddedQueue {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    /// Room for what waits on `tx`, given back by the writer as it takes each op.
    gate: Arc<Gate>,
    thread: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
    counters: Arc<Counters>,
}

/// Counters shared with the writer thread.
#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    syncs: AtomicU64,
    operations: AtomicU64,
}

/// What the writer thread has done since the queue was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EmbeddedStats {
    /// Commits (the durable ones are one `fdatasync` each).
    pub commits: u64,
    /// Durable commits, including those that only make earlier unsynced acks and
    /// leases durable.
    pub syncs: u64,
    /// Operations applied (enqueues, leases, acks, retries, dead letters, reads).
    pub operations: u64,
}

impl fmt::Debug for EmbeddedQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedQueue")
            .field("path", &self.inner.path)
            .finish()
    }
}

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

enum Op {
    Enqueue {
        id: Id,
        attempts: u32,
        key: String,
        not_before: u64,
        /// Already due by the system clock when sent.
        due: bool,
        bytes: Vec<u8>,
        reply: Reply<Enqueued>,
    },
    Lease {
        max: usize,
        lease_for: Duration,
        now: SystemTime,
        reply: Reply<Vec<Leased>>,
    },
    Ack {
        tokens: Vec<LeaseToken>,
        reply: Reply<()>,
    },
    RetryLater {
        token: LeaseToken,
        not_before: SystemTime,
        /// `false`: the delivery is not counted (`Queue::release`).
        counted: bool,
        reply: Reply<()>,
    },
    DeadLetter {
        token: LeaseToken,
        reason: String,
        reply: Reply<()>,
    },
    Depth {
        reply: Reply<Depth>,
    },
    DeadLetters {
        max: usize,
        reply: Reply<Vec<DeadLetter>>,
    },
    DiscardDead {
        ids: Vec<Id>,
        reply: Reply<u64>,
    },
    Close {
        reply: Reply<()>,
    },
}

impl Op {
    /// The room `op` takes while it waits for the writer, in [`Gate::UNIT`]s: an
    /// enqueue's bytes, one unit for anything else; none for `Close`, which must
    /// always get through.
    fn cost(&self) -> u32 {
        match self {
            Op::Close { .. } => 0,
            Op::Enqueue { bytes, .. } => Gate::units(bytes.len()),
            _ => 1,
        }
    }

    /// `true` for operations whose loss in a crash is harmless: a lease (the message is
    /// pending again, as if the lease had expired), an ack (the message is delivered
    /// again, which the idempotency key makes harmless) and reads.
    fn may_stay_unsynced(&self) -> bool {
        matches!(
            self,
            Op::Lease { .. } | Op::Ack { .. } | Op::Depth { .. } | Op::DeadLetters { .. }
        )
    }
}

/// Bounds what waits for the writer thread (the channel itself is unbounded): a sender
/// takes room for its op before sending it, the writer gives it back as it takes the op
/// off the channel, and when the writer is gone the gate is closed, so a sender
/// waiting for room is told the queue is stopped.
struct Gate {
    room: tokio::sync::Semaphore,
    /// All the room there is: one op needing more waits for all of it.
    units: u32,
}

impl Gate {
    /// The unit of room, in bytes.
    const UNIT: usize = 4096;

    fn new(units: u32) -> Self {
        Self {
            room: tokio::sync::Semaphore::new(units as usize),
            units,
        }
    }

    /// `bytes` in units of room, rounded up, at least 1.
    fn units(bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(Self::UNIT).max(1)).unwrap_or(u32::MAX)
    }

    /// Takes room for `op` if there is some now: `Ok(false)` if it must wait.
    fn try_enter(&self, op: &Op) -> Result<bool, QueueError> {
        match self.room.try_acquire_many(op.cost().min(self.units)) {
            Ok(permit) => {
                permit.forget();
                Ok(true)
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => Ok(false),
            Err(tokio::sync::TryAcquireError::Closed) => Err(stopped()),
        }
    }

    /// Waits for room for `op`.
    async fn enter(&self, op: &Op) -> Result<(), QueueError> {
        let permit = self
            .room
            .acquire_many(op.cost().min(self.units))
            .await
            .map_err(|_| stopped())?;
        permit.forget();
        Ok(())
    }

    /// Gives back the room `op` took (the writer took it off the channel).
    fn left(&self, op: &Op) {
        let n = op.cost().min(self.units);
        if n > 0 {
            self.room.add_permits(n as usize);
        }
    }
}

/// The writer's end of the channel: gives each op's room back as it is taken, and
/// closes the gate when dropped (the writer has stopped).
struct Inbox {
    rx: mpsc::Receiver<Op>,
    gate: Arc<Gate>,
}

impl Inbox {
    fn recv(&self) -> Result<Op, mpsc::RecvError> {
        self.rx.recv().inspect(|op| self.gate.left(op))
    }

    fn recv_timeout(&self, timeout: Duration) -> Result<Op, mpsc::RecvTimeoutError> {
        self.rx
            .recv_timeout(timeout)
            .inspect(|op| self.gate.left(op))
    }

    fn try_recv(&self) -> Result<Op, mpsc::TryRecvError> {
        self.rx.try_recv().inspect(|op| self.gate.left(op))
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.gate.room.close();
    }
}

/// Opens the queue's database.
type Opener = Box<dyn Fn() -> Result<Database, QueueError> + Send>;

/// An answer computed inside the transaction, sent once the commit is known: as
/// computed if it succeeded (`None`), else the commit's error.
type Done = Box<dyn FnOnce(Option<&QueueError>) + Send>;

fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, QueueError>) -> Done {
    Box::new(move |failed| {
        // A caller that dropped its future no longer wants the answer.
        let _ = reply.send(match failed {
            None => result,
            Some(e) => Err(replicate(e)),
        });
    })
}

// === impl EmbeddedQueue ===

impl EmbeddedQueue {
    /// Opens (or creates) the queue file at `path` and starts its writer thread.
    ///
    /// # Errors
    /// [`QueueError::Corrupt`] if the file is not a redb database, is damaged or
    /// truncated, or holds a queue of an unknown schema version; [`QueueError::Backend`]
    /// for I/O errors, or if another process has the file open.
    pub fn open(path: impl AsRef<Path>, options: EmbeddedOptions) -> Result<Self, QueueError> {
        let path = path.as_ref().to_path_buf();
        let opener = {
            let (path, options) = (path.clone(), options.clone());
            Box::new(move || open_db(&path, &options))
        };
        Self::open_with(path, options, opener)
    }

    /// Opens the queue in the database `open` opens (again after a failed commit).
    fn open_with(
        path: PathBuf,
        options: EmbeddedOptions,
        open: Opener,
    ) -> Result<Self, QueueError> {
        let db = open()?;
        let (live, recovered_max) = init_tables(&db)?;
        let (tx, rx) = mpsc::channel();
        let gate = Arc::new(Gate::new(options.backlog_units));
        let inbox = Inbox {
            rx,
            gate: gate.clone(),
        };
        let writer = Writer {
            db: Some(db),
            reopen: open,
            broken: false,
            live,
            capacity: options.capacity,
            max_batch: options.max_batch,
            ack_sync: options.ack_sync,
            unsynced_since: None,
            recovered_max,
            // Leases of this open start at a random point: a token kept from before a
            // close and reopen in the same process (its `seq` from 0 again) would match
            // a new lease of the same message whose attempts came out the same. Below
            // 2^31: generations (the low 32 bits of `seq`) still increase for 2^31
            // leases of this open.
            leases: Leases {
                seq: u64::from(fastrand::u32(..1 << 31)),
                ..Leases::default()
            },
            committed_seq: 0,
            counters: Arc::default(),
        };
        let counters = writer.counters.clone();
        let thread = std::thread::Builder::new()
            .name("postbox-queue-writer".into())
            .spawn(move || writer.run(inbox))
            .map_err(|e| QueueError::Backend(Box::new(e)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                tx: Mutex::new(Some(tx)),
                gate,
                thread: Mutex::new(Some(thread)),
                path,
                counters,
            }),
        })
    }

    /// How many commits and operations the writer thread has done: with concurrent
    /// producers, `operations / commits` is the number of operations sharing each fsync.
    pub fn stats(&self) -> EmbeddedStats {
        EmbeddedStats {
            commits: self.inner.counters.commits.load(Ordering::Relaxed),
            syncs: self.inner.counters.syncs.load(Ordering::Relaxed),
            operations: self.inner.counters.operations.load(Ordering::Relaxed),
        }
    }

    /// The queue file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Stops the writer thread after every operation already sent, closes the database
    /// and waits for the thread to end. Later operations on any clone fail with
    /// [`QueueError::Unavailable`].
    ///
    /// # Errors
    /// [`QueueError::Unavailable`] if the queue was already closed.
    pub async fn close(&self) -> Result<(), QueueError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Close { reply })?;
        let res = rx.await.unwrap_or_else(|_| Err(stopped()));
        // The writer has returned (or is returning): drop our sender and join it.
        self.inner.shutdown();
        res
    }

    fn send(&self, op: Op) -> Result<(), QueueError> {
        let tx = self.inner.tx.lock().unwrap_or_else(|e| e.into_inner());
        match tx.as_ref() {
            Some(tx) => tx.send(op).map_err(|_| stopped()),
            None => Err(stopped()),
        }
    }

    /// Sends `op` built around a fresh reply channel and awaits the answer.
    fn call<T>(
        &self,
        op: impl FnOnce(Reply<T>) -> Op,
    ) -> impl Future<Output = Result<T, QueueError>> + Send
    where
        T: Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let op = op(reply);
        // Sent at once when there is room, so operations go in the order they were
        // called; else from the future, once there is room.
        let waiting = match self.inner.gate.try_enter(&op) {
            Ok(true) => self.send(op).map(|()| None),
            Ok(false) => Ok(Some((op, self.clone()))),
            Err(e) => Err(e),
        };
        async move {
            if let Some((op, queue)) = waiting? {
                queue.inner.gate.enter(&op).await?;
                queue.send(op)?;
            }
            rx.await.unwrap_or_else(|_| Err(stopped()))
        }
    }
}

/// Scheduled messages moved to `ready` by one lease, at least (more if it leases more).
const PROMOTE_AT_ONCE: usize = 1024;

/// The largest value redb stores (3 GiB): a larger one would fail the whole commit it
/// shares with other producers' enqueues.
const MAX_STORED: usize = 3 << 30;

/// Refuses an encoded envelope of `len` bytes that redb cannot store, before it joins
/// a commit.
fn check_storable(len: usize) -> Result<(), QueueError> {
    if len > MAX_STORED {
        return Err(QueueError::Backend(
            format!(
                "an encoded envelope of {len} bytes: the embedded queue stores at most {MAX_STORED}"
            )
            .into(),
        ));
    }
    Ok(())
}

/// The error of an operation while the database cannot be opened again after a failed
/// commit: [`QueueError::Unavailable`] (the next operation tries again), unless the file
/// is damaged.
fn unavailable_after_failure(e: QueueError) -> QueueError {
    match e {
        QueueError::Corrupt(_) => e,
        e => QueueError::Unavailable(
            format!("the queue file could not be opened again after a failed commit: {e}").into(),
        ),
    }
}

fn stopped() -> QueueError {
    QueueError::Unavailable("the queue's writer thread has stopped (queue closed)".into())
}

impl Inner {
    fn shutdown(&self) {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            // The writer catches its own panics; a join error cannot carry anything useful.
            let _ = thread.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Queue for EmbeddedQueue {
    fn enqueue(
        &self,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Enqueued, QueueError>> + Send {
        // Encoding happens on the caller's thread, in parallel across producers.
        let sent = envelope.check_encodable().and_then(|()| {
            let bytes = envelope.encode();
            check_storable(bytes.len())?;
            let due = envelope.not_before <= SystemTime::now();
            Ok(self.call(move |reply| Op::Enqueue {
                id: to_id(envelope.id),
                attempts: envelope.attempts,
                key: envelope.idempotency_key,
                due,
                not_before: time_key(envelope.not_before),
                bytes,
                reply,
            }))
        });
        async move { sent?.await }
    }

    fn lease(
        &self,
        max: usize,
        lease_for: Duration,
        now: SystemTime,
    ) -> impl Future<Output = Result<Vec<Leased>, QueueError>> + Send {
        self.call(move |reply| Op::Lease {
            max,
            lease_for,
            now,
            reply,
        })
    }

    fn ack(&self, tokens: &[LeaseToken]) -> impl Future<Output = Result<(), QueueError>> + Send {
        let tokens = tokens.to_vec();
        self.call(move |reply| Op::Ack { tokens, reply })
    }

    fn retry_later(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        self.call(move |reply| Op::RetryLater {
            token,
            not_before,
            counted: true,
            reply,
        })
    }

    fn release(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        self.call(move |reply| Op::RetryLater {
            token,
            not_before,
            counted: false,
            reply,
        })
    }

    fn dead_letter(
        &self,
        token: LeaseToken,
        reason: &str,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        let reason = reason.to_owned();
        self.call(move |reply| Op::DeadLetter {
            token,
            reason,
            reply,
        })
    }

    fn depth(&self) -> impl Future<Output = Result<Depth, QueueError>> + Send {
        self.call(|reply| Op::Depth { reply })
    }

    fn dead_letters(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, QueueError>> + Send {
        self.call(move |reply| Op::DeadLetters { max, reply })
    }

    fn discard_dead_letters(
        &self,
        ids: &[MessageId],
    ) -> impl Future<Output = Result<u64, QueueError>> + Send {
        let ids = ids.iter().map(|&id| to_id(id)).collect();
        self.call(move |reply| Op::DiscardDead { ids, reply })
    }
}

// === opening ===

fn open_db(path: &Path, options: &EmbeddedOptions) -> Result<Database, QueueError> {
    let mut builder = Database::builder();
    builder.set_check_integrity_on_open(options.check_integrity);
    if let Some(bytes) = options.cache_size {
        builder.set_cache_size(bytes);
    }
    // redb documents that a damaged file may panic on open when not checked; never let
    // that escape as a panic.
    let db = match catch_unwind(AssertUnwindSafe(|| builder.create(path))) {
        Ok(res) => res.map_err(|e| db_error(redb::Error::from(e), path))?,
        Err(_) => {
            return Err(QueueError::Corrupt(format!(
                "{}: redb panicked opening the file",
                path.display()
            )));
        }
    };
    // On every open, not only the one that created the file: that one may have been
    // killed, or its sync failed, after the file was made, and the file found there
    // next time would never have its name made durable.
    sync_dir_of(path)?;
    Ok(db)
}

/// Syncs the directory holding the file at `path`: the file's own syncs
/// (every commit's) do not make its name durable (POSIX), so a power loss could take
/// a new queue file, and the messages it acknowledged, with it.
fn sync_dir_of(path: &Path) -> Result<(), QueueError> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            Ok(()) => {}
            // Some filesystems cannot sync a directory (EINVAL on some FUSE, CIFS or
            // vfat mounts): nothing more can be done there.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
                ) =>
            {
                tracing::debug!(path = %path.display(), error = %e, "postbox: the filesystem cannot sync a directory");
            }
            Err(e) => {
                return Err(QueueError::Backend(
                    format!(
                        "{}: syncing the directory of the queue file: {e}",
                        path.display()
                    )
                    .into(),
                ));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Creates the tables if needed, checks the schema version, and counts live messages.
/// Creates or checks the tables; returns the live count and the highest stored id.
fn init_tables(db: &Database) -> Result<(u64, Option<Id>), QueueError> {
    let res = catch_unwind(AssertUnwindSafe(
        || -> Result<(u64, Option<Id>), QueueError> {
            let txn = db.begin_write().map_err(redb_err)?;
            let live;
            let recovered_max;
            {
                let mut meta = txn.open_table(META).map_err(redb_err)?;
                let version = meta
                    .get("schema_version")
                    .map_err(redb_err)?
                    .map(|g| g.value());
                match version {
                    None => {
                        meta.insert("schema_version", SCHEMA_VERSION)
                            .map_err(redb_err)?;
                    }
                    Some(SCHEMA_VERSION) => {}
                    Some(1) => {
                        migrate_v1(&txn)?;
                        meta.insert("schema_version", SCHEMA_VERSION)
                            .map_err(redb_err)?;
                    }
                    Some(v) => {
                        return Err(QueueError::Corrupt(format!(
                            "unknown queue schema version {v} (this build reads {SCHEMA_VERSION})"
                        )));
                    }
                }
                recovered_max = txn
                    .open_table(MESSAGES)
                    .map_err(redb_err)?
                    .last()
                    .map_err(redb_err)?
                    .map(|(id, _)| id.value());
                txn.open_table(DEAD).map_err(redb_err)?;
                txn.open_table(KEYS).map_err(redb_err)?;
                txn.open_table(QUARANTINE).map_err(redb_err)?;
                let scheduled = txn
                    .open_table(SCHEDULED)
                    .map_err(redb_err)?
                    .len()
                    .map_err(redb_err)?;
                let ready = txn
                    .open_table(READY)
                    .map_err(redb_err)?
                    .len()
                    .map_err(redb_err)?;
                live = scheduled + ready;
            }
            txn.commit().map_err(redb_err)?;
            Ok((live, recovered_max))
        },
    ));
    res.unwrap_or_else(|_| Err(QueueError::Corrupt("redb panicked reading the file".into())))
}

/// Version 1 stored leases: every leased message becomes ready again (with its
/// attempts), and the lease tables go.
fn migrate_v1(txn: &WriteTransaction) -> Result<(), QueueError> {
    {
        let in_flight = txn.open_table(V1_IN_FLIGHT).map_err(redb_err)?;
        let mut ready = txn.open_table(READY).map_err(redb_err)?;
        for entry in in_flight.iter().map_err(redb_err)? {
            let (id, lease) = entry.map_err(redb_err)?;
            ready
                .insert(id.value(), lease.value().1)
                .map_err(redb_err)?;
        }
    }
    txn.delete_table(V1_IN_FLIGHT).map_err(redb_err)?;
    txn.delete_table(V1_EXPIRY).map_err(redb_err)?;
    Ok(())
}

fn db_error(e: redb::Error, path: &Path) -> QueueError {
    match redb_err(e) {
        QueueError::Corrupt(m) => QueueError::Corrupt(format!("{}: {m}", path.display())),
        other => other,
    }
}

/// Maps a redb error: damage and unknown file formats are [`QueueError::Corrupt`],
/// everything else [`QueueError::Backend`].
fn redb_err(e: impl Into<redb::Error>) -> QueueError {
    let e: redb::Error = e.into();
    match e {
        redb::Error::Corrupted(m) => QueueError::Corrupt(m),
        redb::Error::UpgradeRequired(v) => {
            QueueError::Corrupt(format!("unsupported redb file format version {v}"))
        }
        redb::Error::Io(ref io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            QueueError::Corrupt(e.to_string())
        }
        other => QueueError::Backend(Box::new(other)),
    }
}

/// A copy of an error, for answering every operation of a failed batch.
fn replicate(e: &QueueError) -> QueueError {
    match e {
        QueueError::Full { capacity } => QueueError::Full {
            capacity: *capacity,
        },
        QueueError::LeaseLost(t) => QueueError::LeaseLost(*t),
        QueueError::Corrupt(m) => QueueError::Corrupt(m.clone()),
        QueueError::Unavailable(e) => QueueError::Unavailable(e.to_string().into()),
        QueueError::Backend(e) => QueueError::Backend(e.to_string().into()),
    }
}

/// Nanoseconds since the Unix epoch, saturating (times before 1970 are 0).
fn time_key(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

// === the writer thread ===

struct Writer {
    /// `None` once closed, or while `broken`.
    db: Option<Database>,
    /// Opens the database file again (after a failed commit).
    reopen: Opener,
    /// A commit failed: the database is opened again before the next operation (redb
    /// refuses every write after a failed commit until it is).
    broken: bool,
    /// Pending + in-flight messages, for the capacity check.
    live: u64,
    capacity: Option<u64>,
    max_batch: usize,
    /// How long acks and leases may stay unsynced.
    ack_sync: Duration,
    /// When the oldest commit not yet made durable was made.
    unsynced_since: Option<Instant>,
    /// The highest id stored when the queue was opened: a lease of one at or below it
    /// is a redelivery (module docs).
    recovered_max: Option<Id>,
    leases: Leases,
    /// `leases.seq` after the last commit that went through: a lease whose `seq` is at
    /// or above it was made by a batch that failed.
    committed_seq: u64,
    counters: Arc<Counters>,
}

/// The messages in flight (module docs): leased ids are still in `ready`.
#[derive(Debug, Default)]
struct Leases {
    /// Leased id → its lease.
    by_id: HashMap<Id, Lease>,
    /// Leases made so far: the high half of every generation, so generations increase
    /// with every lease even when a delivery is not counted.
    seq: u64,
    /// The same leases by expiry.
    by_expiry: BTreeSet<(u64, Id)>,
    /// Every ready id above the cursor is free (`None`: every ready id is free).
    cursor: Option<Id>,
    /// The free ready ids at or below the cursor, with their attempts.
    low: BTreeMap<Id, u32>,
}

/// One message's lease.
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Until when (ns since the Unix epoch).
    until: u64,
    /// The message's attempts, this lease's included.
    attempts: u32,
    /// The token's generation: `seq`'s low 32 bits above `attempts`.
    generation: u64,
    /// [`Leases::seq`] when it was made (whole: the generation keeps only its low bits).
    seq: u64,
}

impl Leases {
    /// Ends the lease of `id` (if any).
    fn end(&mut self, id: Id) -> Option<Lease> {
        let lease = self.by_id.remove(&id)?;
        self.by_expiry.remove(&(lease.until, id));
        Some(lease)
    }
}

impl Writer {
    fn run(mut self, rx: Inbox) {
        // Ends when every sender is gone (the queue was dropped) or on `Close`.
        loop {
            let first = match self.unsynced_since {
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(since) => rx.recv_timeout(self.ack_sync.saturating_sub(since.elapsed())),
            };
            let first = match first {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.sync();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            if self.broken
                && !matches!(first, Op::Close { .. })
                && let Err(e) = self.repair()
            {
                // Everything waiting gets this answer: one reopen (maybe a repair of
                // the whole file) per operation would keep the writer busy.
                unanswered(first)(Some(&e));
                while let Ok(op) = rx.try_recv() {
                    if let Op::Close { .. } = op {
                        self.finish(op, &rx);
                        return;
                    }
                    unanswered(op)(Some(&e));
                }
                continue;
            }
            let close = match first {
                close @ Op::Close { .. } => close,
                op => match self.apply(op, &rx) {
                    Some(close) => close,
                    None => {
                        // A batch of reads alone (a depth, an empty lease) commits
                        // nothing, so it cannot carry a sync that is due: made here,
                        // or reads arriving without a pause would hold it off for ever.
                        if !self.broken
                            && self
                                .unsynced_since
                                .is_some_and(|since| since.elapsed() >= self.ack_sync)
                        {
                            self.sync();
                        }
                        continue;
                    }
                },
            };
            self.finish(close, &rx);
            return;
        }
        let _ = self.close();
    }

    /// Closes on `close`, answers it, and refuses anything sent after it.
    fn finish(&mut self, close: Op, rx: &Inbox) {
        let result = self.close();
        if let Op::Close { reply } = close {
            let _ = reply.send(result);
        }
        // Anything sent after the close is refused (dropping its reply says so).
        while let Ok(op) = rx.try_recv() {
            drop(op);
        }
    }

    fn close(&mut self) -> Result<(), QueueError> {
        if self.broken {
            self.repair()?;
        }
        if self.db.is_none() {
            return Err(stopped());
        }
        // Makes unsynced acks and leases durable; dropping the database then releases
        // the file lock.
        let synced = self.try_sync();
        drop(self.db.take());
        synced
    }

    /// Opens the database again after a failed commit: what was committed durably is
    /// there, and the leases held by consumers stay theirs (see [`kept_leases`]).
    fn repair(&mut self) -> Result<(), QueueError> {
        drop(self.db.take());
        let db = (self.reopen)().map_err(unavailable_after_failure)?;
        let (live, recovered_max) = init_tables(&db).map_err(unavailable_after_failure)?;
        self.leases = kept_leases(&db, &self.leases, self.committed_seq)
            .map_err(unavailable_after_failure)?;
        tracing::warn!(
            in_flight = self.leases.by_id.len(),
            "postbox queue opened again after a failed commit"
        );
        self.db = Some(db);
        self.live = live;
        self.recovered_max = recovered_max;
        self.unsynced_since = None;
        self.broken = false;
        Ok(())
    }

    /// Makes every earlier commit durable (an empty durable commit), if one is not.
    fn sync(&mut self) {
        // After a failed commit nothing can be synced: the database is opened again
        // (acks and leases not synced by then may be lost, so redelivered).
        let synced = if self.broken {
            self.repair()
        } else {
            self.try_sync()
        };
        if let Err(e) = synced {
            // The commits stay unsynced; the next durable commit retries, or this after
            // another `ack_sync` (not at once: a disk that is full would pin a core).
            tracing::error!(error = %e, "postbox queue sync failed");
            if self.unsynced_since.is_some() {
                self.unsynced_since = Some(Instant::now());
            }
        }
    }

    fn try_sync(&mut self) -> Result<(), QueueError> {
        let (Some(db), Some(_)) = (self.db.as_ref(), self.unsynced_since) else {
            return Ok(());
        };
        let res = catch_unwind(AssertUnwindSafe(|| -> Result<(), QueueError> {
            let mut txn = db.begin_write().map_err(redb_err)?;
            txn.set_durability(redb::Durability::Immediate)
                .map_err(|e| QueueError::Backend(Box::new(e)))?;
            txn.commit().map_err(redb_err)
        }))
        .unwrap_or_else(|_| Err(QueueError::Corrupt("redb panicked during a sync".into())));
        match &res {
            Ok(()) => {
                self.unsynced_since = None;
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
            }
            // Every commit fails from now on until the file is opened again.
            Err(_) => self.broken = true,
        }
        res
    }

    /// Applies `first` and every op waiting on the channel — including those that arrive
    /// while the transaction is being applied, up to `max_batch` in all — in one write
    /// transaction, commits it once, then answers. Producers that were a moment late
    /// share this commit instead of waiting for a commit of their own. A `Close` taken
    /// from the channel ends the batch; it is returned, not applied, for the caller.
    fn apply(&mut self, first: Op, rx: &Inbox) -> Option<Op> {
        let db = self.db.as_ref()?;
        let mut done = Vec::new();
        let mut ops = Arrivals {
            needs_sync: !first.may_stay_unsynced(),
            taken: 1,
            first: Some(first),
            more: Some(rx),
            max: self.max_batch,
            close: None,
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<(), QueueError> {
            let mut txn = db.begin_write().map_err(redb_err)?;
            let mut state = State {
                live: &mut self.live,
                capacity: self.capacity,
                recovered_max: self.recovered_max,
                redelivered: false,
                leases: &mut self.leases,
            };
            let res = apply_ops(&txn, &mut ops, &mut done, &mut state);
            // Ops not reached because of a storage error: answered with that error below
            // (nothing more is taken from the channel).
            ops.more = None;
            for op in ops.by_ref() {
                done.push(unanswered(op));
            }
            // Immediate is redb 4's default, stated so a change of default cannot weaken
            // the promise; a batch of leases and acks alone needs no fsync until
            // `ack_sync` has passed since the oldest unsynced commit (module docs).
            let sync_due = match self.unsynced_since {
                Some(since) => since.elapsed() >= self.ack_sync,
                None => self.ack_sync.is_zero(),
            };
            let durable = sync_due || ops.needs_sync || state.redelivered;
            txn.set_durability(if durable {
                redb::Durability::Immediate
            } else {
                redb::Durability::None
            })
            .map_err(|e| QueueError::Backend(Box::new(e)))?;
            if res? {
                txn.commit().map_err(redb_err)?;
                self.committed_seq = self.leases.seq;
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                if durable {
                    self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                    self.unsynced_since = None;
                } else {
                    self.unsynced_since.get_or_insert_with(Instant::now);
                }
                Ok(())
            } else {
                // Only reads (or refused operations): nothing to make durable, no fsync.
                txn.abort().map_err(redb_err)
            }
        }));
        // Ops not reached because `begin_write` failed or the batch panicked: answered
        // with the failure too (dropped unanswered, they would read "queue closed").
        ops.more = None;
        for op in ops.by_ref() {
            done.push(unanswered(op));
        }
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(QueueError::Corrupt("redb panicked during a write".into())),
        };
        if let Some(err) = &failure {
            // redb refuses every write after a failed commit, or after any failed write
            // to the file (a full disk, a failed fsync), until it is opened again: the
            // next operation does that, and `repair` also rebuilds the live count and
            // the leases this batch changed in memory (no operation runs before it). (A
            // batch fails only on a storage error: refused operations are answered one
            // by one.)
            self.broken = true;
            tracing::error!(error = %err, "postbox queue commit failed");
        }
        self.counters
            .operations
            .fetch_add(ops.taken as u64, Ordering::Relaxed);
        for d in done {
            d(failure.as_ref());
        }
        ops.close
    }
}

/// The leases that outlive opening the database again after a failed commit: each one
/// made by a batch that committed, whose message the file still has. Dropping them
/// all (as a crash does) let every message in flight be leased again at once while
/// its consumer still held it: two deliveries at the same time, and the first
/// consumer's ack refused as [`QueueError::LeaseLost`].
///
/// A kept lease's message may be back in `scheduled` in the file: the lease that
/// promoted it to `ready` committed without a sync, and the reopen lost that. It is put
/// back in `ready` (with a durable commit) and its lease kept.
///
/// Not kept: a lease the failed batch made (its caller got the error, so nobody holds
/// it), and one whose message the file has in neither (an ack of it is `LeaseLost`). A
/// lease the failed batch ended (an ack, a retry) is not in memory any more, and its
/// message, still `ready` in the file, is free again: the ack failed, so it is
/// delivered again. The free list is rebuilt from the file: the cursor moves back to
/// the highest kept lease, and every other ready id at or below it is free.
fn kept_leases(db: &Database, old: &Leases, committed_seq: u64) -> Result<Leases, QueueError> {
    let res = catch_unwind(AssertUnwindSafe(|| -> Result<Leases, redb::Error> {
        let mut txn = db.begin_write()?;
        let mut leases = Leases {
            seq: old.seq,
            ..Leases::default()
        };
        let mut moved = false;
        {
            let mut ready = txn.open_table(READY)?;
            let mut missing = HashMap::new();
            for (&id, &lease) in &old.by_id {
                if lease.seq >= committed_seq {
                    continue;
                }
                if ready.get(id)?.is_some() {
                    leases.by_id.insert(id, lease);
                } else {
                    missing.insert(id, lease);
                }
            }
            if !missing.is_empty() {
                let mut scheduled = txn.open_table(SCHEDULED)?;
                let mut back = Vec::new();
                for entry in scheduled.iter()? {
                    let (k, attempts) = entry?;
                    let (nb, id) = k.value();
                    if missing.contains_key(&id) {
                        back.push((nb, id, attempts.value()));
                    }
                }
                for (nb, id, attempts) in back {
                    scheduled.remove((nb, id))?;
                    ready.insert(id, attempts)?;
                    leases.by_id.insert(id, missing[&id]);
                    moved = true;
                }
            }
            for (&id, lease) in &leases.by_id {
                leases.by_expiry.insert((lease.until, id));
            }
            leases.cursor = leases.by_id.keys().max().copied();
            if let Some(cursor) = leases.cursor {
                for entry in ready.range(..=cursor)? {
                    let (id, attempts) = entry?;
                    if !leases.by_id.contains_key(&id.value()) {
                        leases.low.insert(id.value(), attempts.value());
                    }
                }
            }
        }
        if moved {
            txn.set_durability(redb::Durability::Immediate)?;
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(leases)
    }));
    match res {
        Ok(leases) => leases.map_err(redb_err),
        Err(_) => Err(QueueError::Corrupt(
            "redb panicked reading the leased messages after a failed commit".into(),
        )),
    }
}

/// The ops of one transaction: the first, then (while `more` is set) whatever is on the
/// channel by the time the transaction asks, up to `max` in all, stopping at a `Close`.
struct Arrivals<'r> {
    first: Option<Op>,
    more: Option<&'r Inbox>,
    max: usize,
    taken: usize,
    /// Whether any op taken needs a durable commit.
    needs_sync: bool,
    close: Option<Op>,
}

impl Iterator for Arrivals<'_> {
    type Item = Op;

    fn next(&mut self) -> Option<Op> {
        if let Some(op) = self.first.take() {
            return Some(op);
        }
        if self.taken >= self.max || self.close.is_some() {
            return None;
        }
        match self.more?.try_recv().ok()? {
            close @ Op::Close { .. } => {
                self.close = Some(close);
                None
            }
            op => {
                self.taken += 1;
                self.needs_sync |= !op.may_stay_unsynced();
                Some(op)
            }
        }
    }
}

/// The answer to an op a failed batch never reached: the batch's error.
fn unanswered(op: Op) -> Done {
    fn never<T>() -> Result<T, QueueError> {
        Err(QueueError::Backend("not applied".into()))
    }
    match op {
        Op::Enqueue { reply, .. } => answer(reply, never()),
        Op::Lease { reply, .. } => answer(reply, never()),
        Op::Ack { reply, .. }
        | Op::RetryLater { reply, .. }
        | Op::DeadLetter { reply, .. }
        | Op::Close { reply } => answer(reply, never()),
        Op::Depth { reply } => answer(reply, never()),
        Op::DeadLetters { reply, .. } => answer(reply, never()),
        Op::DiscardDead { reply, .. } => answer(reply, never()),
    }
}

/// Open tables of one write transaction.
struct Tables<'t> {
    messages: redb::Table<'t, Id, &'static [u8]>,
    scheduled: redb::Table<'t, (u64, Id), u32>,
    ready: redb::Table<'t, Id, u32>,
    dead: redb::Table<'t, Id, &'static str>,
    keys: redb::Table<'t, &'static str, Id>,
    /// For the tables only a rare op opens (`quarantine`).
    txn: &'t WriteTransaction,
    /// Messages quarantined whose keys are still to be freed: one scan of the key
    /// index for all of them ([`Tables::forget_quarantined_keys`]), not one each.
    unkeyed: Vec<Id>,
    /// Whether anything was written (else the transaction is aborted, saving an fsync).
    dirty: bool,
}

/// The writer's state an op may change besides the tables.
struct State<'s> {
    /// Pending + in-flight messages, for the capacity check.
    live: &'s mut u64,
    capacity: Option<u64>,
    /// See [`Writer::recovered_max`].
    recovered_max: Option<Id>,
    /// A redelivery was leased: the batch commits durably (module docs).
    redelivered: bool,
    leases: &'s mut Leases,
}

/// Applies each op; a logic error (lease lost, full, duplicate) is that op's answer and
/// changes nothing, a storage error aborts the whole batch. Returns whether anything was
/// written.
fn apply_ops(
    txn: &WriteTransaction,
    ops: &mut impl Iterator<Item = Op>,
    done: &mut Vec<Done>,
    st: &mut State<'_>,
) -> Result<bool, QueueError> {
    let mut t = Tables {
        messages: txn.open_table(MESSAGES).map_err(redb_err)?,
        scheduled: txn.open_table(SCHEDULED).map_err(redb_err)?,
        ready: txn.open_table(READY).map_err(redb_err)?,
        dead: txn.open_table(DEAD).map_err(redb_err)?,
        keys: txn.open_table(KEYS).map_err(redb_err)?,
        txn,
        unkeyed: Vec::new(),
        dirty: false,
    };
    for op in ops.by_ref() {
        match op {
            Op::Enqueue {
                id,
                attempts,
                key,
                not_before,
                due,
                bytes,
                reply,
            } => {
                let r = t.enqueue((id, attempts), &key, (not_before, due), &bytes, st);
                keep_logic_error(r, |r| done.push(answer(reply, r)))?;
            }
            Op::Lease {
                max,
                lease_for,
                now,
                reply,
            } => {
                let r = t.lease(max, lease_for, now, st);
                keep_logic_error(r, |r| done.push(answer(reply, r)))?;
            }
            Op::Ack { tokens, reply } => {
                let r = t.ack(&tokens, st);
                keep_logic_error(r, |r| done.push(answer(reply, r)))?;
            }
            Op::RetryLater {
                token,
                not_before,
                counted,
                reply,
            } => {
                let r = t.retry_later(token, not_before, counted, st);
                keep_logic_error(r, |r| done.push(answer(reply, r)))?;
            }
            Op::DeadLetter {
                token,
                reason,
                reply,
            } => {
                let r = t.dead_letter(token, &reason, st);
                keep_logic_error(r, |r| done.push(answer(reply, r)))?;
            }
            Op::Depth { reply } => {
                let r = t.depth(st.leases);
                keep_logic_error(r, |r| done.push(answer(reply, r)))?;
            }
            Op::DeadLetters { max, reply } => {
                let r = t.dead_letters(max);
                keep_logic_error(r, |r| done.push(answer(reply, r)))?;
            }
            Op::DiscardDead { ids, reply } => {
                let r = t.discard_dead(&ids);
                keep_logic_error(r, |r| done.push(answer(reply, r)))?;
            }
            Op::Close { reply } => {
                // Split off by the writer loop before a batch is applied.
                done.push(answer(reply, Err(stopped())));
            }
        }
    }
    Ok(t.dirty)
}

/// Splits sorted ids into runs an ordered pass can remove cheaply: ids are UUIDv7, so
/// the messages stored between two of them were created between their timestamps
/// (the top 48 bits, in ms). A gap of more than [`DENSE_GAP_MS`] starts a new run, so a
/// pass never walks a long stretch of messages that are not being removed; ids that
/// are not time-ordered end up in runs of one, removed one by one.
fn dense_runs(ids: &[Id]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=ids.len() {
        let split =
            i == ids.len() || (ids[i] >> 80).saturating_sub(ids[i - 1] >> 80) > DENSE_GAP_MS;
        if split {
            runs.push(start..i);
            start = i;
        }
    }
    runs
}

/// See [`dense_runs`].
const DENSE_GAP_MS: u128 = 10;

/// Ends the lease of `token` in memory if it is current; returns the lease's attempts.
fn end_lease(token: LeaseToken, st: &mut State<'_>) -> Result<u32, QueueError> {
    let id = to_id(token.id);
    match st.leases.by_id.get(&id) {
        Some(lease) if lease.generation == token.generation => {
            let lease = st.leases.end(id).expect("looked up above");
            Ok(lease.attempts)
        }
        _ => Err(QueueError::LeaseLost(token)),
    }
}

/// Records `r` as the op's answer, unless it is a storage error (which fails the batch:
/// part of the op may have been written). The op is then answered with that error too,
/// like every op of the batch (not with "queue closed", as an unanswered op would be).
fn keep_logic_error<T>(
    r: Result<T, QueueError>,
    record: impl FnOnce(Result<T, QueueError>),
) -> Result<(), QueueError> {
    match r {
        Err(e @ (QueueError::Backend(_) | QueueError::Corrupt(_) | QueueError::Unavailable(_))) => {
            record(Err(replicate(&e)));
            Err(e)
        }
        r => {
            record(r);
            Ok(())
        }
    }
}

impl Tables<'_> {
    fn enqueue(
        &mut self,
        (id, attempts): (Id, u32),
        key: &str,
        (not_before, due): (u64, bool),
        bytes: &[u8],
        st: &mut State<'_>,
    ) -> Result<Enqueued, QueueError> {
        if let Some(capacity) = st.capacity
            && *st.live >= capacity
        {
            // A duplicate is answered as one even when the queue is full.
            if !key.is_empty()
                && let Some(existing) = self.keys.get(key).map_err(redb_err)?.map(|g| g.value())
                && self.messages.get(existing).map_err(redb_err)?.is_some()
            {
                return Ok(Enqueued::Duplicate(from_id(existing)));
            }
            if self.messages.get(id).map_err(redb_err)?.is_some() {
                return Ok(Enqueued::Duplicate(from_id(id)));
            }
            return Err(QueueError::Full { capacity });
        }
        // Insert first and look at what was replaced: one descent per table instead of
        // a lookup and an insert. A duplicate (rare) puts the replaced entry back; the
        // batch's transaction is aborted anyway if nothing else was written.
        if !key.is_empty() {
            let replaced = self.keys.insert(key, id).map_err(redb_err)?;
            // A key whose message is gone (its ack could not read the key from a
            // damaged value, so left it) is free: the new message takes it instead of
            // being answered as a duplicate of nothing, for ever.
            if let Some(existing) = replaced.map(|g| g.value())
                && self.messages.get(existing).map_err(redb_err)?.is_some()
            {
                self.keys.insert(key, existing).map_err(redb_err)?;
                return Ok(Enqueued::Duplicate(from_id(existing)));
            }
        }
        let replaced = self.messages.insert(id, bytes).map_err(redb_err)?;
        if let Some(existing) = replaced.map(|g| g.value().to_vec()) {
            self.messages
                .insert(id, existing.as_slice())
                .map_err(redb_err)?;
            if !key.is_empty() {
                self.keys.remove(key).map_err(redb_err)?;
            }
            return Ok(Enqueued::Duplicate(from_id(id)));
        }
        if due {
            self.make_ready(id, attempts, st)?;
        } else {
            self.scheduled
                .insert((not_before, id), attempts)
                .map_err(redb_err)?;
        }
        *st.live += 1;
        self.dirty = true;
        Ok(Enqueued::Stored(from_id(id)))
    }

    /// Puts a message that is in no index into `ready`, free to lease.
    fn make_ready(&mut self, id: Id, attempts: u32, st: &mut State<'_>) -> Result<(), QueueError> {
        self.ready.insert(id, attempts).map_err(redb_err)?;
        self.dirty = true;
        if st.leases.cursor.is_some_and(|c| id <= c) {
            st.leases.low.insert(id, attempts);
        }
        Ok(())
    }

    /// Up to `n` free ready ids, lowest first, taken off the free list (the caller leases
    /// or reschedules each).
    fn take_free(&mut self, n: usize, st: &mut State<'_>) -> Result<Vec<(Id, u32)>, QueueError> {
        let mut out = Vec::with_capacity(n.min(1024));
        while out.len() < n {
            let Some((id, attempts)) = st.leases.low.pop_first() else {
                break;
            };
            out.push((id, attempts));
        }
        if out.len() < n {
            let from = match st.leases.cursor {
                Some(c) => Bound::Excluded(c),
                None => Bound::Unbounded,
            };
            for entry in self
                .ready
                .range::<Id>((from, Bound::Unbounded))
                .map_err(redb_err)?
                .take(n - out.len())
            {
                let (id, attempts) = entry.map_err(redb_err)?;
                out.push((id.value(), attempts.value()));
            }
            if let Some(&(last, _)) = out.last()
                && st.leases.cursor.is_none_or(|c| last > c)
            {
                st.leases.cursor = Some(last);
            }
        }
        Ok(out)
    }

    fn lease(
        &mut self,
        max: usize,
        lease_for: Duration,
        now: SystemTime,
        st: &mut State<'_>,
    ) -> Result<Vec<Leased>, QueueError> {
        let out = self.lease_due(max, lease_for, now, st)?;
        self.forget_quarantined_keys()?;
        Ok(out)
    }

    fn lease_due(
        &mut self,
        max: usize,
        lease_for: Duration,
        now: SystemTime,
        st: &mut State<'_>,
    ) -> Result<Vec<Leased>, QueueError> {
        let now_k = time_key(now);
        // Expired leases are free again (they never left `ready`).
        while let Some(&(until, id)) = st.leases.by_expiry.first() {
            if until > now_k {
                break;
            }
            let lease = st.leases.end(id).expect("indexed by expiry");
            st.leases.low.insert(id, lease.attempts);
        }
        // Due scheduled messages to ready: a bounded number per lease, so a backlog
        // that fell due at once (after an outage, or a restart after downtime) is not
        // rewritten in one transaction that every producer waits for. Those promoted are
        // the earliest due; among them, leases go oldest first.
        for _ in 0..max.max(PROMOTE_AT_ONCE) {
            let first = self
                .scheduled
                .first()
                .map_err(redb_err)?
                .map(|(k, v)| (k.value(), v.value()));
            match first {
                Some(((nb, id), attempts)) if nb <= now_k => {
                    self.scheduled.remove((nb, id)).map_err(redb_err)?;
                    self.make_ready(id, attempts, st)?;
                }
                _ => break,
            }
        }
        let lease_until = super::saturating_add(now, lease_for);
        let until_k = time_key(lease_until);
        let mut out = Vec::new();
        while out.len() < max {
            let free = self.take_free(max - out.len(), st)?;
            if free.is_empty() {
                break;
            }
            for (id, attempts) in free {
                let mut env = match self.stored_envelope(id)? {
                    Ok(env) => env,
                    Err(why) => {
                        // One bad record must not stop every lease after it.
                        self.quarantine(id, &why, st)?;
                        continue;
                    }
                };
                if time_key(env.not_before) > now_k {
                    // Went to `ready` by the system clock, but not due at this lease's
                    // `now`.
                    self.ready.remove(id).map_err(redb_err)?;
                    self.scheduled
                        .insert((time_key(env.not_before), id), attempts)
                        .map_err(redb_err)?;
                    self.dirty = true;
                    continue;
                }
                if attempts > 0 || st.recovered_max.is_some_and(|max| id <= max) {
                    st.redelivered = true;
                }
                let attempts = attempts.saturating_add(1);
                env.attempts = attempts;
                // The attempt is counted in the file too (made durable with the next
                // sync), so a reopen or a crash after a sync does not forget it.
                self.ready.insert(id, attempts).map_err(redb_err)?;
                self.dirty = true;
                let seq = st.leases.seq;
                let generation = seq << 32 | u64::from(attempts);
                st.leases.seq += 1;
                st.leases.by_id.insert(
                    id,
                    Lease {
                        until: until_k,
                        attempts,
                        generation,
                        seq,
                    },
                );
                st.leases.by_expiry.insert((until_k, id));
                out.push(Leased {
                    envelope: env,
                    token: LeaseToken {
                        id: from_id(id),
                        generation,
                    },
                    lease_until,
                });
            }
        }
        Ok(out)
    }

    /// The stored envelope of `id`, or why there is none ([`NOT_STORED`], or
    /// undecodable); the outer error is the storage's.
    fn stored_envelope(&self, id: Id) -> Result<Result<Envelope, String>, QueueError> {
        let Some(guard) = self.messages.get(id).map_err(redb_err)? else {
            return Ok(Err(NOT_STORED.to_owned()));
        };
        Ok(Envelope::decode(guard.value()).map_err(|e| e.to_string()))
    }

    /// Takes a ready message that cannot be decoded out of the queue for good: out of
    /// `ready` and (with [`forget_quarantined_keys`](Self::forget_quarantined_keys))
    /// the key index, into `quarantine` with `why` (its bytes stay in `messages` for
    /// inspection). Logged at error level and counted in
    /// `postbox_queue_quarantined_total`.
    fn quarantine(&mut self, id: Id, why: &str, st: &mut State<'_>) -> Result<(), QueueError> {
        tracing::error!(id = %from_id(id), reason = why, "postbox: undecodable queued message quarantined");
        metrics::counter!("postbox_queue_quarantined_total").increment(1);
        self.ready.remove(id).map_err(redb_err)?;
        self.unkeyed.push(id);
        self.txn
            .open_table(QUARANTINE)
            .map_err(redb_err)?
            .insert(id, why)
            .map_err(redb_err)?;
        *st.live = st.live.saturating_sub(1);
        self.dirty = true;
        Ok(())
    }

    /// Frees the keys of the messages quarantined since the last call. A key cannot be
    /// read from undecodable bytes: it is found by owner, in one scan of the key index
    /// for all of them (a lease reaching thousands of them, after a rollback to a
    /// release that cannot read a newer envelope version, made one scan each, in one
    /// transaction every producer waited for).
    fn forget_quarantined_keys(&mut self) -> Result<(), QueueError> {
        match self.unkeyed.len() {
            0 => return Ok(()),
            1 => {
                let id = self.unkeyed[0];
                self.keys.retain(|_, owner| owner != id).map_err(redb_err)?;
            }
            _ => {
                let ids: std::collections::HashSet<Id> = self.unkeyed.iter().copied().collect();
                self.keys
                    .retain(|_, owner| !ids.contains(&owner))
                    .map_err(redb_err)?;
            }
        }
        self.unkeyed.clear();
        Ok(())
    }

    /// Ends the lease of `token` if it is current and takes the message out of `ready`;
    /// returns the lease's attempts.
    fn release(
        &mut self,
        token: LeaseToken,
        st: &mut State<'_>,
    ) -> Result<Result<u32, QueueError>, QueueError> {
        match end_lease(token, st) {
            Ok(attempts) => {
                self.ready.remove(to_id(token.id)).map_err(redb_err)?;
                self.dirty = true;
                Ok(Ok(attempts))
            }
            Err(lost) => Ok(Err(lost)),
        }
    }

    /// Removes `key` from the index if it belongs to `id`.
    fn forget_key(&mut self, key: &str, id: Id) -> Result<(), QueueError> {
        if key.is_empty() {
            return Ok(());
        }
        let owner = self.keys.remove(key).map_err(redb_err)?.map(|g| g.value());
        if let Some(owner) = owner.filter(|&owner| owner != id) {
            self.keys.insert(key, owner).map_err(redb_err)?;
        }
        Ok(())
    }

    fn ack(&mut self, tokens: &[LeaseToken], st: &mut State<'_>) -> Result<(), QueueError> {
        let mut lost = None;
        let mut ids = Vec::with_capacity(tokens.len());
        for &token in tokens {
            match end_lease(token, st) {
                Ok(_) => ids.push(to_id(token.id)),
                Err(e) => {
                    lost.get_or_insert(e);
                }
            }
        }
        // A token given twice fails `end_lease` the second time: no duplicates here.
        ids.sort_unstable();
        if ids.is_empty() {
            return lost.map_or(Ok(()), Err);
        }
        self.dirty = true;
        *st.live -= ids.len() as u64;
        let mut keys = Vec::new();
        for run in dense_runs(&ids) {
            let run = &ids[run];
            // One ordered pass over each table instead of a descent per message.
            let range = run[0]..=run[run.len() - 1];
            self.messages
                .retain_in(range.clone(), |id, bytes| {
                    if run.binary_search(&id).is_err() {
                        return true;
                    }
                    if let Some(k) = super::envelope::peek_idempotency_key(bytes) {
                        keys.push((k.to_owned(), id));
                    }
                    false
                })
                .map_err(redb_err)?;
            self.ready
                .retain_in(range, |id, _| run.binary_search(&id).is_err())
                .map_err(redb_err)?;
        }
        for (key, id) in keys {
            self.forget_key(&key, id)?;
        }
        lost.map_or(Ok(()), Err)
    }

    fn retry_later(
        &mut self,
        token: LeaseToken,
        not_before: SystemTime,
        counted: bool,
        st: &mut State<'_>,
    ) -> Result<(), QueueError> {
        let mut attempts = self.release(token, st)??;
        if !counted {
            attempts = attempts.saturating_sub(1);
        }
        let id = to_id(token.id);
        let Some(mut env) = self.envelope_or_quarantine(id, st)? else {
            return Err(QueueError::LeaseLost(token));
        };
        env.not_before = not_before;
        env.attempts = attempts;
        self.messages
            .insert(id, env.encode().as_slice())
            .map_err(redb_err)?;
        self.scheduled
            .insert((time_key(not_before), id), attempts)
            .map_err(redb_err)?;
        Ok(())
    }

    fn dead_letter(
        &mut self,
        token: LeaseToken,
        reason: &str,
        st: &mut State<'_>,
    ) -> Result<(), QueueError> {
        let attempts = self.release(token, st)??;
        let id = to_id(token.id);
        let Some(mut env) = self.envelope_or_quarantine(id, st)? else {
            return Err(QueueError::LeaseLost(token));
        };
        env.attempts = attempts;
        self.messages
            .insert(id, env.encode().as_slice())
            .map_err(redb_err)?;
        self.forget_key(&env.idempotency_key, id)?;
        self.dead.insert(id, reason).map_err(redb_err)?;
        *st.live -= 1;
        Ok(())
    }

    fn depth(&self, leases: &Leases) -> Result<Depth, QueueError> {
        let in_flight = leases.by_id.len() as u64;
        Ok(Depth {
            pending: (self.scheduled.len().map_err(redb_err)?
                + self.ready.len().map_err(redb_err)?)
            .saturating_sub(in_flight),
            in_flight,
            // Quarantined messages are dead letters that cannot be decoded (the brokers
            // keep such messages among their dead letters too).
            dead: self.dead.len().map_err(redb_err)?
                + self
                    .txn
                    .open_table(QUARANTINE)
                    .map_err(redb_err)?
                    .len()
                    .map_err(redb_err)?,
        })
    }

    /// Deletes the dead letters `ids` (their reasons and their bytes), quarantined ones
    /// too.
    fn discard_dead(&mut self, ids: &[Id]) -> Result<u64, QueueError> {
        let mut discarded = 0;
        let mut quarantine = self.txn.open_table(QUARANTINE).map_err(redb_err)?;
        for &id in ids {
            if self.dead.remove(id).map_err(redb_err)?.is_some() {
                self.messages.remove(id).map_err(redb_err)?;
            } else if let Some(why) = quarantine.remove(id).map_err(redb_err)? {
                // Quarantined for missing bytes: bytes there now are the same envelope
                // enqueued again since, a live message, kept. (Undecodable bytes keep
                // their id taken: they go, whatever a newer release could read.)
                if why.value() != NOT_STORED {
                    self.messages.remove(id).map_err(redb_err)?;
                }
            } else {
                continue;
            }
            self.dirty = true;
            discarded += 1;
        }
        Ok(discarded)
    }

    /// Up to `max` dead letters; one whose bytes cannot be decoded is skipped and logged
    /// (it must not fail this read, nor the enqueues sharing its commit), and does not
    /// count: `max` of them at the head must not hide the rest from a redrive. Then the
    /// quarantined messages whose bytes this release decodes (written by a newer one,
    /// quarantined by an older one after a rollback), with their quarantine reason, so
    /// a redrive brings them back; those quarantined for missing bytes are not (bytes
    /// there now are the same envelope enqueued again, a live message).
    fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let mut out = Vec::new();
        for entry in self.dead.iter().map_err(redb_err)? {
            if out.len() >= max {
                return Ok(out);
            }
            let (id, reason) = entry.map_err(redb_err)?;
            match self.stored_envelope(id.value())? {
                Ok(envelope) => out.push(DeadLetter {
                    envelope,
                    reason: reason.value().to_owned(),
                }),
                Err(why) => tracing::error!(
                    id = %from_id(id.value()),
                    reason = why,
                    "postbox: undecodable dead letter skipped"
                ),
            }
        }
        let quarantine = self.txn.open_table(QUARANTINE).map_err(redb_err)?;
        for entry in quarantine.iter().map_err(redb_err)? {
            if out.len() >= max {
                break;
            }
            let (id, reason) = entry.map_err(redb_err)?;
            if reason.value() == NOT_STORED {
                continue;
            }
            // Still undecodable: logged when it was quarantined.
            if let Ok(envelope) = self.stored_envelope(id.value())? {
                out.push(DeadLetter {
                    envelope,
                    reason: reason.value().to_owned(),
                });
            }
        }
        Ok(out)
    }

    /// The stored envelope of a message whose lease just ended, or `None` if it cannot
    /// be decoded (damaged since it was leased): then quarantined, as a lease would.
    fn envelope_or_quarantine(
        &mut self,
        id: Id,
        st: &mut State<'_>,
    ) -> Result<Option<Envelope>, QueueError> {
        match self.stored_envelope(id)? {
            Ok(env) => Ok(Some(env)),
            Err(why) => {
                self.quarantine(id, &why, st)?;
                self.forget_quarantined_keys()?;
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use redb::ReadableDatabase;

    fn envelope(key: &str) -> Envelope {
        let mut env = Envelope::new(
            "api:443",
            "POST",
            "https://api/orders",
            Bytes::from_static(b"{}"),
            super::super::DeferReason::CircuitOpen,
        );
        env.idempotency_key = key.to_owned();
        env
    }

    /// Damages the stored bytes of message `id` in the (closed) queue at `path`; redb's
    /// own checksums still hold.
    fn damage(path: &Path, id: MessageId) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(MESSAGES)
            .unwrap()
            .insert(to_id(id), &b"PBOX\x63garbage"[..])
            .unwrap();
        txn.commit().unwrap();
    }

    /// The gate lets through what fits, makes the next sender wait until the writer
    /// takes an op off the channel, and tells a waiting sender the queue stopped once
    /// the writer's end is gone.
    #[tokio::test]
    async fn the_write_backlog_makes_senders_wait_for_room() {
        let (tx, rx) = mpsc::channel();
        let gate = Arc::new(Gate::new(2));
        let inbox = Inbox {
            rx,
            gate: gate.clone(),
        };
        let read = || Op::Depth {
            reply: oneshot::channel().0,
        };
        let big = || Op::Enqueue {
            id: 1,
            attempts: 0,
            key: String::new(),
            not_before: 0,
            due: true,
            bytes: vec![0; 3 * Gate::UNIT],
            reply: oneshot::channel().0,
        };
        for _ in 0..2 {
            assert!(gate.try_enter(&read()).unwrap());
            tx.send(read()).unwrap();
        }
        assert!(!gate.try_enter(&read()).unwrap(), "the backlog is full");
        let op = big();
        let mut waiting = tokio_test::task::spawn(gate.enter(&op));
        tokio_test::assert_pending!(waiting.poll());
        inbox.try_recv().unwrap();
        // Larger than the whole backlog: it waits for all of it.
        tokio_test::assert_pending!(waiting.poll());
        inbox.try_recv().unwrap();
        tokio_test::assert_ready_ok!(waiting.poll());
        drop(waiting);
        let op = read();
        let mut stopped = tokio_test::task::spawn(gate.enter(&op));
        tokio_test::assert_pending!(stopped.poll());
        drop(inbox);
        assert!(matches!(
            tokio_test::assert_ready!(stopped.poll()),
            Err(QueueError::Unavailable(_))
        ));
        assert!(gate.try_enter(&read()).is_err());
    }

    /// With a backlog of one unit, many concurrent producers of envelopes larger than
    /// it all get through: the writer gives the room back as it takes each op.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn producers_over_a_tiny_write_backlog_are_all_stored() {
        let dir = tempfile::tempdir().unwrap();
        let q = EmbeddedQueue::open(
            dir.path().join("q.redb"),
            EmbeddedOptions::new().with_write_backlog(1),
        )
        .unwrap();
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let q = q.clone();
                tokio::spawn(async move {
                    let mut env = envelope(&format!("k{i}"));
                    env.body = Bytes::from(vec![b'x'; 10_000]);
                    q.enqueue(env).await
                })
            })
            .collect();
        let all = async {
            for t in tasks {
                assert!(matches!(t.await.unwrap(), Ok(Enqueued::Stored(_))));
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("producers stuck behind the write backlog");
        assert_eq!(q.depth().await.unwrap().pending, 64);
        q.close().await.unwrap();
    }

    /// A key left behind by a message that is gone (an ack that could not read the key
    /// from a damaged value leaves it) does not de-duplicate: a new message with the
    /// key is stored instead of being answered as a duplicate of nothing for ever, and
    /// a full queue says it is full.
    #[tokio::test]
    async fn a_key_whose_message_is_gone_is_taken_by_the_next_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        {
            let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
            q.close().await.unwrap();
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let mut keys = txn.open_table(KEYS).unwrap();
            for key in ["k", "full"] {
                keys.insert(key, to_id(envelope(key).id)).unwrap();
            }
            drop(keys);
            txn.commit().unwrap();
        }
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new().with_capacity(1)).unwrap();
        let env = envelope("k");
        let id = env.id;
        assert_eq!(q.enqueue(env).await.unwrap(), Enqueued::Stored(id));
        assert_eq!(
            q.enqueue(envelope("k")).await.unwrap(),
            Enqueued::Duplicate(id)
        );
        let full = q.enqueue(envelope("full")).await;
        assert!(matches!(full, Err(QueueError::Full { .. })), "{full:?}");
        assert_eq!(q.depth().await.unwrap().pending, 1);
    }

    /// Sets (or, with `None`, deletes) the stored bytes of `id` in the closed queue
    /// file at `path`, behind the queue's back.
    fn set_stored_bytes(path: &Path, id: MessageId, bytes: Option<&[u8]>) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut messages = txn.open_table(MESSAGES).unwrap();
            match bytes {
                Some(bytes) => drop(messages.insert(to_id(id), bytes).unwrap()),
                None => drop(messages.remove(to_id(id)).unwrap()),
            }
        }
        txn.commit().unwrap();
    }

    /// A message quarantined because its bytes were missing, then enqueued again as it
    /// was (same id: a caller's retry), lives: discarding the quarantined id (an
    /// operator deleting what the log named) drops the quarantine entry, not the live
    /// message's bytes.
    #[tokio::test]
    async fn discarding_a_quarantined_id_keeps_the_live_message_enqueued_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let env = envelope("lost-bytes");
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        q.enqueue(env.clone()).await.unwrap();
        q.close().await.unwrap();
        set_stored_bytes(&path, env.id, None);
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let lease = Duration::from_secs(30);
        assert!(
            q.lease(10, lease, SystemTime::now())
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(q.depth().await.unwrap().dead, 1, "quarantined");
        assert_eq!(
            q.enqueue(env.clone()).await.unwrap(),
            Enqueued::Stored(env.id)
        );
        assert_eq!(q.discard_dead_letters(&[env.id]).await.unwrap(), 1);
        let got = q.lease(10, lease, SystemTime::now()).await.unwrap();
        assert_eq!(
            got.len(),
            1,
            "the live message was discarded with the quarantine"
        );
        assert_eq!(got[0].envelope.id, env.id);
        q.close().await.unwrap();
    }

    /// A message written by a newer release and quarantined by an older one (a
    /// rollback) is listed among the dead letters once the newer release is back, and
    /// a redrive delivers it. (Nothing could list it: a message whose enqueue was
    /// answered was stranded for good.) One quarantined for missing bytes is not
    /// listed.
    #[tokio::test]
    async fn a_message_from_a_newer_release_is_redriven_after_a_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let env = envelope("from-a-newer-release");
        let gone = envelope("bytes-lost");
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        q.enqueue(env.clone()).await.unwrap();
        q.enqueue(gone.clone()).await.unwrap();
        q.close().await.unwrap();
        let mut newer = env.encode();
        newer[4] += 1;
        set_stored_bytes(&path, env.id, Some(&newer));
        set_stored_bytes(&path, gone.id, None);
        // The older release quarantines both.
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let lease = Duration::from_secs(30);
        assert!(
            q.lease(10, lease, SystemTime::now())
                .await
                .unwrap()
                .is_empty()
        );
        assert!(q.dead_letters(10).await.unwrap().is_empty());
        assert_eq!(q.depth().await.unwrap().dead, 2);
        q.close().await.unwrap();
        // The newer release (which reads its own bytes) is back.
        set_stored_bytes(&path, env.id, Some(&env.encode()));
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let dead = q.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].envelope.id, env.id);
        assert!(dead[0].reason.contains("version"), "{}", dead[0].reason);
        assert_eq!(q.redrive_dead_letters(10).await.unwrap(), 1);
        let got = q.lease(10, lease, SystemTime::now()).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].envelope.idempotency_key, env.idempotency_key);
        assert_eq!(q.depth().await.unwrap().dead, 1, "the missing one stays");
        q.close().await.unwrap();
    }

    /// A message quarantined for bytes this release cannot decode (a newer envelope
    /// version, after a rollback) is discarded with its bytes, even if a later release
    /// could read them: its id is free again, not held by bytes nothing can reach.
    #[tokio::test]
    async fn discarding_an_undecodable_quarantined_id_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let env = envelope("newer-version");
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        q.enqueue(env.clone()).await.unwrap();
        q.close().await.unwrap();
        set_stored_bytes(&path, env.id, Some(b"PBOX\xff not this release's"));
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let lease = Duration::from_secs(30);
        assert!(
            q.lease(10, lease, SystemTime::now())
                .await
                .unwrap()
                .is_empty()
        );
        q.close().await.unwrap();
        // The release that reads them is back.
        set_stored_bytes(&path, env.id, Some(&env.encode()));
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        assert_eq!(q.discard_dead_letters(&[env.id]).await.unwrap(), 1);
        assert_eq!(
            q.enqueue(env.clone()).await.unwrap(),
            Enqueued::Stored(env.id)
        );
        let got = q.lease(10, lease, SystemTime::now()).await.unwrap();
        assert_eq!(got.len(), 1);
        q.close().await.unwrap();
    }

    /// A version-1 file (leases stored) opens as version 2: its leased message is
    /// ready again with the attempts it had, its pending one stays, the key still
    /// de-duplicates, and the lease tables are gone.
    #[tokio::test]
    async fn a_version_1_file_is_migrated_with_its_leased_messages_ready_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let (leased, pending) = (envelope("leased-key"), envelope("pending-key"));
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", 1)
                .unwrap();
            let mut messages = txn.open_table(MESSAGES).unwrap();
            let mut keys = txn.open_table(KEYS).unwrap();
            for env in [&leased, &pending] {
                messages.insert(to_id(env.id), &env.encode()[..]).unwrap();
                keys.insert(env.idempotency_key.as_str(), to_id(env.id))
                    .unwrap();
            }
            txn.open_table(READY)
                .unwrap()
                .insert(to_id(pending.id), 0)
                .unwrap();
            txn.open_table(V1_IN_FLIGHT)
                .unwrap()
                .insert(to_id(leased.id), (1_000, 2))
                .unwrap();
            txn.open_table(V1_EXPIRY)
                .unwrap()
                .insert((1_000, to_id(leased.id)), ())
                .unwrap();
            drop((messages, keys));
            txn.commit().unwrap();
        }
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        assert_eq!(q.depth().await.unwrap().pending, 2);
        let again = q.enqueue(envelope("leased-key")).await.unwrap();
        assert!(
            matches!(again, Enqueued::Duplicate(id) if id == leased.id),
            "{again:?}"
        );
        let now = SystemTime::now();
        let mut got = q.lease(10, Duration::from_secs(30), now).await.unwrap();
        got.sort_by_key(|l| l.envelope.idempotency_key.clone());
        let attempts: Vec<_> = got
            .iter()
            .map(|l| (l.envelope.idempotency_key.as_str(), l.envelope.attempts))
            .collect();
        // Each counts this lease on top of what it had.
        assert_eq!(attempts, [("leased-key", 3), ("pending-key", 1)]);
        q.close().await.unwrap();
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let version = txn.open_table(META).unwrap().get("schema_version").unwrap();
        assert_eq!(version.map(|v| v.value()), Some(SCHEMA_VERSION));
        assert!(
            txn.open_table(V1_IN_FLIGHT).is_err(),
            "the v1 lease table is left"
        );
    }

    /// A backlog that fell due at once is moved to `ready` a bounded batch per lease,
    /// not all in one transaction every producer waits for; every message is still
    /// leased in the end.
    #[tokio::test]
    async fn a_backlog_falling_due_at_once_is_promoted_in_bounded_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let later = SystemTime::now() + Duration::from_secs(3600);
        let n = PROMOTE_AT_ONCE + 100;
        let mut producers = tokio::task::JoinSet::new();
        for i in 0..n {
            let q = q.clone();
            producers.spawn(async move {
                let mut env = envelope(&format!("k{i}"));
                env.not_before = later;
                q.enqueue(env).await.unwrap();
            });
        }
        producers.join_all().await;
        let due = later + Duration::from_secs(1);
        let first = q.lease(1, Duration::from_secs(60), due).await.unwrap();
        assert_eq!(first.len(), 1);
        q.close().await.unwrap();
        let scheduled = {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_read().unwrap();
            txn.open_table(SCHEDULED).unwrap().len().unwrap()
        };
        assert_eq!(scheduled, 100, "promoted more than a batch at once");
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let mut leased = 0;
        loop {
            let batch = q.lease(500, Duration::from_secs(60), due).await.unwrap();
            if batch.is_empty() {
                break;
            }
            leased += batch.len();
        }
        assert_eq!(
            leased, n,
            "every message leased (the first one again: reopening ends leases)"
        );
        q.close().await.unwrap();
    }

    /// An envelope over redb's 3 GiB value limit is refused on its own, before it joins
    /// (and fails) a commit shared with other producers' enqueues.
    #[test]
    fn an_envelope_over_the_value_limit_is_refused_alone() {
        assert!(check_storable(3 << 30).is_ok());
        let e = check_storable((3 << 30) + 1).unwrap_err();
        assert!(matches!(e, QueueError::Backend(_)), "{e}");
    }

    /// An in-memory disk that fails its writes and syncs while `fail` is set (a full
    /// disk, a failed fsync); opened again, it holds what was written.
    #[derive(Debug, Clone, Default)]
    struct FlakyDisk {
        disk: Arc<redb::backends::InMemoryBackend>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FlakyDisk {
        fn check(&self) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "no space left on device",
                ));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for FlakyDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.disk.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.disk.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.disk.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.disk.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.disk.write(offset, data)
        }
    }

    /// A queue on a [`FlakyDisk`].
    fn flaky_queue(options: EmbeddedOptions) -> (FlakyDisk, EmbeddedQueue) {
        let disk = FlakyDisk::default();
        let opened = disk.clone();
        let open: Opener = Box::new(move || {
            Database::builder()
                .create_with_backend(opened.clone())
                .map_err(|e| redb_err(redb::Error::from(e)))
        });
        let q = EmbeddedQueue::open_with("flaky".into(), options, open).unwrap();
        (disk, q)
    }

    /// A failed commit (a full disk) fails that batch only: the queue opens its file
    /// again and goes on once the disk has room, with what was stored before. (redb
    /// refuses every write after a failed commit: every later enqueue, lease and ack
    /// failed as `Corrupt` until the process restarted.)
    #[tokio::test]
    async fn the_queue_works_again_after_a_failed_commit() {
        let (disk, q) = flaky_queue(EmbeddedOptions::new());
        q.enqueue(envelope("a")).await.unwrap();
        let now = SystemTime::now();
        let before = q.lease(10, Duration::from_secs(30), now).await.unwrap();
        assert_eq!(before.len(), 1);
        disk.fail.store(true, Ordering::SeqCst);
        assert!(q.enqueue(envelope("b")).await.is_err());
        disk.fail.store(false, Ordering::SeqCst);
        q.enqueue(envelope("c")).await.unwrap();
        let now = SystemTime::now();
        let leased = q.lease(10, Duration::from_secs(30), now).await.unwrap();
        let keys: Vec<_> = leased
            .iter()
            .map(|l| l.envelope.idempotency_key.as_str())
            .collect();
        assert_eq!(keys, ["c"]);
        q.ack(&[leased[0].token]).await.unwrap();
        let depth = q.depth().await.unwrap();
        assert_eq!((depth.pending, depth.in_flight), (0, 1));
        q.close().await.unwrap();
    }

    /// A failed commit keeps the leases consumers hold: their messages are not leased
    /// again while held, and the holders' acks go through. (Opening the file again used
    /// to drop every lease: each message in flight was leased again at once, delivered
    /// twice at the same time, and its first consumer's ack was `LeaseLost`.)
    #[tokio::test]
    async fn a_failed_commit_keeps_the_leases_consumers_hold() {
        let (disk, q) = flaky_queue(EmbeddedOptions::new());
        for key in ["a", "b", "c"] {
            q.enqueue(envelope(key)).await.unwrap();
        }
        let now = SystemTime::now();
        let held = q.lease(2, Duration::from_secs(30), now).await.unwrap();
        assert_eq!(held.len(), 2);
        disk.fail.store(true, Ordering::SeqCst);
        assert!(q.enqueue(envelope("d")).await.is_err());
        disk.fail.store(false, Ordering::SeqCst);
        q.enqueue(envelope("e")).await.unwrap();
        // Only what nobody holds: `c` (free before the failure) and `e`.
        let now = SystemTime::now();
        let leased = q.lease(10, Duration::from_secs(30), now).await.unwrap();
        let keys: Vec<_> = leased
            .iter()
            .map(|l| l.envelope.idempotency_key.as_str())
            .collect();
        assert_eq!(keys, ["c", "e"]);
        let mut tokens: Vec<_> = held.iter().map(|l| l.token).collect();
        tokens.extend(leased.iter().map(|l| l.token));
        q.ack(&tokens).await.unwrap();
        let depth = q.depth().await.unwrap();
        assert_eq!((depth.pending, depth.in_flight), (0, 0));
        // The held leases still expire: after a second failure, a lease held past its
        // expiry frees its message.
        q.enqueue(envelope("f")).await.unwrap();
        let now = SystemTime::now();
        let f = q.lease(1, Duration::from_secs(30), now).await.unwrap();
        disk.fail.store(true, Ordering::SeqCst);
        assert!(q.enqueue(envelope("g")).await.is_err());
        disk.fail.store(false, Ordering::SeqCst);
        let later = now + Duration::from_secs(31);
        let again = q.lease(10, Duration::from_secs(30), later).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].envelope.id, f[0].envelope.id);
        assert!(matches!(
            q.ack(&[f[0].token]).await,
            Err(QueueError::LeaseLost(_))
        ));
        q.close().await.unwrap();
    }

    /// A message that reached `ready` from `scheduled` by a lease whose commit was not
    /// synced is back in `scheduled` once the file is opened again: its lease is kept
    /// all the same (the message goes back to `ready`, leased), not leased a second
    /// time.
    #[tokio::test]
    async fn a_failed_commit_keeps_the_lease_of_a_message_promoted_from_scheduled() {
        let (disk, q) =
            flaky_queue(EmbeddedOptions::new().with_ack_sync(Duration::from_secs(3600)));
        let now = SystemTime::now();
        let mut later = envelope("later");
        later.not_before = now + Duration::from_secs(1);
        q.enqueue(later).await.unwrap();
        let due = now + Duration::from_secs(2);
        let held = q.lease(10, Duration::from_secs(30), due).await.unwrap();
        assert_eq!(held.len(), 1);
        disk.fail.store(true, Ordering::SeqCst);
        assert!(q.enqueue(envelope("lost")).await.is_err());
        disk.fail.store(false, Ordering::SeqCst);
        let again = q.lease(10, Duration::from_secs(30), due).await.unwrap();
        assert!(again.is_empty(), "leased twice: {again:?}");
        q.ack(&[held[0].token]).await.unwrap();
        let depth = q.depth().await.unwrap();
        assert_eq!((depth.pending, depth.in_flight), (0, 0));
        q.close().await.unwrap();
    }

    /// Which leases a reopen keeps is judged by the lease's whole counter, not the low
    /// bits its token's generation keeps: past 2^32 leases, a lease the failed batch
    /// made was kept (nobody held it, and its message waited for it to expire).
    #[test]
    fn a_lease_the_failed_batch_made_is_dropped_past_two_to_the_32_leases() {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap();
        init_tables(&db).unwrap();
        let (a, b) = (1, 2);
        let txn = db.begin_write().unwrap();
        {
            let mut ready = txn.open_table(READY).unwrap();
            ready.insert(a, 1).unwrap();
            ready.insert(b, 1).unwrap();
        }
        txn.commit().unwrap();
        let lease = |seq: u64| Lease {
            until: u64::MAX,
            attempts: 1,
            generation: seq << 32 | 1,
            seq,
        };
        let base = 1 << 32;
        let mut old = Leases {
            seq: base + 10,
            ..Leases::default()
        };
        old.by_id.insert(a, lease(base + 3));
        old.by_id.insert(b, lease(base + 7));
        let kept = kept_leases(&db, &old, base + 5).unwrap();
        assert!(kept.by_id.contains_key(&a));
        assert!(
            !kept.by_id.contains_key(&b),
            "the failed batch's lease was kept"
        );
        assert_eq!(kept.low.keys().copied().collect::<Vec<_>>(), [] as [Id; 0]);
        assert_eq!(kept.cursor, Some(a));
    }

    /// A lease or an ack that a failed commit refused leaves nothing behind: the lease
    /// does not hold its message (nobody got it), and the message whose ack failed is
    /// delivered again.
    #[tokio::test]
    async fn a_lease_or_ack_a_failed_commit_refused_leaves_the_message_free() {
        // Every commit durable, so a lease or an ack alone writes (and can fail).
        let (disk, q) = flaky_queue(EmbeddedOptions::new().with_ack_sync(Duration::ZERO));
        let id = q.enqueue(envelope("a")).await.unwrap().id();
        let now = SystemTime::now();
        disk.fail.store(true, Ordering::SeqCst);
        assert!(q.lease(10, Duration::from_secs(30), now).await.is_err());
        disk.fail.store(false, Ordering::SeqCst);
        let leased = q.lease(10, Duration::from_secs(30), now).await.unwrap();
        assert_eq!(leased.len(), 1, "the refused lease held the message");
        assert_eq!(leased[0].envelope.id, id);
        // `b` is leased after `a` and held across the failure of `a`'s ack.
        q.enqueue(envelope("b")).await.unwrap();
        let now = SystemTime::now();
        let b = q.lease(10, Duration::from_secs(30), now).await.unwrap();
        assert_eq!(b.len(), 1);
        disk.fail.store(true, Ordering::SeqCst);
        assert!(q.ack(&[leased[0].token]).await.is_err());
        disk.fail.store(false, Ordering::SeqCst);
        let again = q.lease(10, Duration::from_secs(30), now).await.unwrap();
        let ids: Vec<_> = again.iter().map(|l| l.envelope.id).collect();
        assert_eq!(ids, [id], "the message whose ack failed is not free");
        q.ack(&[again[0].token, b[0].token]).await.unwrap();
        q.close().await.unwrap();
    }

    #[tokio::test]
    async fn an_undecodable_message_is_quarantined_and_leasing_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let bad = q.enqueue(envelope("bad-key")).await.unwrap().id();
        let good = q.enqueue(envelope("good-key")).await.unwrap().id();
        q.close().await.unwrap();
        damage(&path, bad);
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let now = SystemTime::now();
        let leased = q.lease(10, Duration::from_secs(30), now).await.unwrap();
        let ids: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
        assert_eq!(ids, vec![good]);
        // Gone for good: not leased again, not pending, and its key is free.
        assert!(
            q.lease(10, Duration::from_secs(30), now)
                .await
                .unwrap()
                .is_empty()
        );
        // Counted among the dead letters, not listed with them (nothing to decode).
        let depth = q.depth().await.unwrap();
        assert_eq!((depth.pending, depth.in_flight, depth.dead), (0, 1, 1));
        assert!(q.dead_letters(10).await.unwrap().is_empty());
        let again = q.enqueue(envelope("bad-key")).await.unwrap();
        assert!(matches!(again, Enqueued::Stored(_)), "{again:?}");
        q.close().await.unwrap();
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_read().unwrap();
            let table = txn.open_table(QUARANTINE).unwrap();
            let why = table.get(to_id(bad)).unwrap().unwrap().value().to_owned();
            assert!(why.contains("version"), "{why}");
        }
        // Deleted by its id, as a dead letter is.
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        assert_eq!(q.discard_dead_letters(&[bad]).await.unwrap(), 1);
        assert_eq!(q.depth().await.unwrap().dead, 0);
        assert_eq!(q.discard_dead_letters(&[bad]).await.unwrap(), 0);
        q.close().await.unwrap();
    }

    /// Many undecodable messages reached by one lease are all quarantined and all their
    /// keys freed (in one scan of the key index, not one each).
    #[tokio::test]
    async fn many_undecodable_messages_in_one_lease_all_free_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let mut bad = Vec::new();
        for i in 0..5 {
            bad.push(q.enqueue(envelope(&format!("bad-{i}"))).await.unwrap().id());
        }
        let good = q.enqueue(envelope("good")).await.unwrap().id();
        q.close().await.unwrap();
        for &id in &bad {
            damage(&path, id);
        }
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let leased = q
            .lease(10, Duration::from_secs(30), SystemTime::now())
            .await
            .unwrap();
        let ids: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
        assert_eq!(ids, vec![good]);
        assert_eq!(q.depth().await.unwrap().dead, 5);
        for i in 0..5 {
            let again = q.enqueue(envelope(&format!("bad-{i}"))).await.unwrap();
            assert!(matches!(again, Enqueued::Stored(_)), "{i}: {again:?}");
        }
        let dup = q.enqueue(envelope("good")).await.unwrap();
        assert_eq!(dup, Enqueued::Duplicate(good), "a live key is kept");
        q.close().await.unwrap();
    }

    /// A dead letter whose bytes were damaged is skipped by `dead_letters` and logged,
    /// not an error: a monitor polling the dead letters failed every read, and every
    /// enqueue that shared its commit.
    #[tokio::test]
    async fn a_damaged_dead_letter_is_skipped_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let bad = q.enqueue(envelope("bad-key")).await.unwrap().id();
        let good = q.enqueue(envelope("good-key")).await.unwrap().id();
        for l in q
            .lease(2, Duration::from_secs(30), SystemTime::now())
            .await
            .unwrap()
        {
            q.dead_letter(l.token, "gave up").await.unwrap();
        }
        q.close().await.unwrap();
        damage(&path, bad);
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let dead = q.dead_letters(10).await.unwrap();
        let ids: Vec<_> = dead.iter().map(|d| d.envelope.id).collect();
        assert_eq!(ids, vec![good]);
        // The damaged one at the head does not use up `max`: a redrive of one gets
        // past it.
        let dead = q.dead_letters(1).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(q.redrive_dead_letters(1).await.unwrap(), 1);
        q.enqueue(envelope("next")).await.unwrap();
        q.close().await.unwrap();
    }

    /// A body the envelope format cannot hold (4 GiB or more) is a clear error at
    /// `enqueue`, not a panic in the caller (the enqueue layer's `max_body` keeps it
    /// off that path; a direct caller had no guard). The body's pages are never
    /// touched: allocated zeroed, lazily.
    #[tokio::test]
    async fn a_body_too_large_for_the_format_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let q = EmbeddedQueue::open(dir.path().join("q.redb"), EmbeddedOptions::new()).unwrap();
        let mut e = envelope("huge");
        e.body = Bytes::from(vec![0u8; u32::MAX as usize + 1]);
        let err = q.enqueue(e).await.unwrap_err();
        assert!(
            matches!(&err, QueueError::Backend(m) if m.to_string().contains("body")),
            "{err:?}"
        );
        assert_eq!(q.depth().await.unwrap().pending, 0);
    }

    #[test]
    fn dense_runs_split_where_ids_are_more_than_10_ms_apart() {
        let at = |ms: u128, n: u128| ms << 80 | n;
        let ids = [
            at(5, 1),
            at(5, 2),
            at(15, 0),
            at(26, 0),
            at(27, 0),
            at(1000, 0),
        ];
        assert_eq!(super::dense_runs(&ids), vec![0..3, 3..5, 5..6]);
        assert!(super::dense_runs(&[]).is_empty());
    }
}
