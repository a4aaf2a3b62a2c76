//! Durability of the embedded queue: reopen after a clean close, after a simulated
//! crash, after a real SIGKILL of a process with 64 producers; damaged files are
//! refused with an error, never a panic.

#![cfg(feature = "embedded")]
#![allow(missing_docs)] // test crate

use bytes::Bytes;
use postbox::queue::{
    DeferReason, Depth, EmbeddedOptions, EmbeddedQueue, Envelope, MessageId, Queue, QueueError,
};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const LEASE: Duration = Duration::from_secs(30);
const CHILD_ENV: &str = "POSTBOX_TEST_CHILD_QUEUE";

fn envelope(i: usize) -> Envelope {
    Envelope::new(
        "api:443",
        "POST",
        format!("https://api/orders/{i}"),
        Bytes::from(vec![b'x'; 1024]),
        DeferReason::CircuitOpen,
    )
}

fn far_future() -> SystemTime {
    SystemTime::now() + Duration::from_secs(10 * 365 * 24 * 3600)
}

/// Every message id in the queue (pending or in flight), by leasing everything far in
/// the future (which also reclaims every lease).
async fn all_ids(q: &EmbeddedQueue) -> BTreeSet<MessageId> {
    q.lease(usize::MAX, LEASE, far_future())
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.envelope.id)
        .collect()
}

/// What a crash leaves: a copy of the file taken while the queue is still open, opened.
fn open_crashed_copy(dir: &Path, path: &Path) -> EmbeddedQueue {
    let crashed = dir.join("crashed.redb");
    std::fs::copy(path, &crashed).unwrap();
    EmbeddedQueue::open(&crashed, EmbeddedOptions::new()).unwrap()
}

/// Leases up to `n` messages due now and returns their tokens.
async fn lease_tokens(q: &EmbeddedQueue, n: usize) -> Vec<postbox::queue::LeaseToken> {
    let leased = q.lease(n, LEASE, SystemTime::now()).await.unwrap();
    leased.iter().map(|l| l.token).collect()
}

async fn fill(q: &EmbeddedQueue, n: usize) -> BTreeSet<MessageId> {
    let mut ids = BTreeSet::new();
    for i in 0..n {
        ids.insert(q.enqueue(envelope(i)).await.unwrap().id());
    }
    ids
}

#[tokio::test]
async fn reopen_after_clean_close_keeps_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
    let ids = fill(&q, 50).await;
    let now = SystemTime::now();
    let leased = q.lease(10, LEASE, now).await.unwrap();
    q.ack(&[leased[0].token]).await.unwrap();
    q.dead_letter(leased[1].token, "gave up").await.unwrap();
    let before = q.depth().await.unwrap();
    q.close().await.unwrap();
    assert!(
        matches!(q.depth().await, Err(QueueError::Unavailable(_))),
        "closed"
    );

    let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
    assert_eq!(before.in_flight, 8);
    // Leases live in the writer's memory: after a reopen, in-flight messages are pending.
    assert_eq!(
        q.depth().await.unwrap(),
        Depth {
            pending: before.pending + 8,
            in_flight: 0,
            dead: 1
        }
    );
    let mut expected = ids;
    expected.remove(&leased[0].envelope.id);
    expected.remove(&leased[1].envelope.id);
    assert_eq!(all_ids(&q).await, expected);
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead[0].envelope.id, leased[1].envelope.id);
    assert_eq!(dead[0].reason, "gave up");
}

#[tokio::test]
async fn reopen_after_drop_without_close_keeps_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
    let ids = fill(&q, 20).await;
    drop(q);
    let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
    assert_eq!(all_ids(&q).await, ids);
}

/// A token kept from before a close and reopen (here, one whose lease was released
/// uncounted) does not ack the message's new lease: each open's leases start at a
/// random point. Before, both opens numbered their leases from 0, and the new lease,
/// with the same attempts, had the old token's generation.
#[tokio::test]
async fn a_token_from_before_a_reopen_does_not_ack_a_new_lease() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
    q.enqueue(envelope(1)).await.unwrap();
    let old = lease_tokens(&q, 1).await[0];
    q.release(old, SystemTime::UNIX_EPOCH).await.unwrap();
    q.close().await.unwrap();
    drop(q);
    let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
    let new = lease_tokens(&q, 1).await[0];
    assert_eq!(new.id, old.id);
    assert!(
        matches!(q.ack(&[old]).await, Err(QueueError::LeaseLost(_))),
        "the old token acked the new lease"
    );
    q.ack(&[new]).await.unwrap();
    assert!(all_ids(&q).await.is_empty());
}

/// A crash leaves the file as the last commit wrote it: a copy taken while the queue is
/// still open and never closed stands in for that file.
#[tokio::test]
async fn reopen_after_simulated_crash_keeps_every_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let q = Arc::new(EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap());
    let mut tasks = Vec::new();
    for t in 0..8 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..25 {
                ids.push(q.enqueue(envelope(t * 100 + i)).await.unwrap().id());
            }
            ids
        }));
    }
    let mut acknowledged = BTreeSet::new();
    for t in tasks {
        acknowledged.extend(t.await.unwrap());
    }

    let reopened = open_crashed_copy(dir.path(), &path);
    assert_eq!(all_ids(&reopened).await, acknowledged);
    drop(q);
}

/// Acks commit without an fsync until `ack_sync` has passed: a crash before that
/// delivers the acked messages again, and loses none.
#[tokio::test]
async fn a_crash_after_unsynced_acks_delivers_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let never = EmbeddedOptions::new().with_ack_sync(Duration::from_secs(3600));
    let q = EmbeddedQueue::open(&path, never).unwrap();
    let ids = fill(&q, 40).await;
    let syncs = q.stats().syncs;
    let tokens = lease_tokens(&q, 40).await;
    q.ack(&tokens).await.unwrap();
    assert_eq!(q.stats().syncs, syncs, "the ack batch was not fsynced");
    assert_eq!(q.depth().await.unwrap().pending, 0);

    let reopened = open_crashed_copy(dir.path(), &path);
    assert_eq!(all_ids(&reopened).await, ids);
    drop(q);
}

/// A message that kills its consumer is counted: the lease of a redelivery (a message
/// stored before the queue was opened, which a process that died may have leased, or
/// one leased before) commits durably, so a crash right after it keeps the attempt and
/// the message reaches the dead letters instead of crashing every restart. A first
/// delivery's lease still costs no fsync.
#[tokio::test]
async fn a_crash_right_after_leasing_a_redelivery_keeps_its_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let never = EmbeddedOptions::new().with_ack_sync(Duration::from_secs(3600));
    let q = EmbeddedQueue::open(&path, never.clone()).unwrap();
    fill(&q, 1).await;
    q.close().await.unwrap();

    // The restart after the first crash: the message was stored before.
    let q = EmbeddedQueue::open(&path, never).unwrap();
    let fresh = q.enqueue(envelope(1)).await.unwrap().id();
    let syncs = q.stats().syncs;
    let leased = q.lease(1, LEASE, SystemTime::now()).await.unwrap();
    assert_eq!(leased[0].envelope.attempts, 1);
    assert_ne!(leased[0].envelope.id, fresh);
    assert!(
        q.stats().syncs > syncs,
        "the redelivery's lease was not fsynced"
    );
    // The process dies now, before any other commit.
    let crashed = open_crashed_copy(dir.path(), &path);
    let again = crashed.lease(1, LEASE, SystemTime::now()).await.unwrap();
    assert_eq!(again[0].envelope.id, leased[0].envelope.id);
    assert_eq!(
        again[0].envelope.attempts, 2,
        "the crash forgot the attempt"
    );

    // A message enqueued since the open is a first delivery: no fsync for its lease.
    let syncs = q.stats().syncs;
    let first = q.lease(1, LEASE, SystemTime::now()).await.unwrap();
    assert_eq!(first[0].envelope.id, fresh);
    assert_eq!(q.stats().syncs, syncs);
    drop((q, crashed));
}

#[tokio::test]
async fn close_makes_unsynced_acks_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let never = EmbeddedOptions::new().with_ack_sync(Duration::from_secs(3600));
    let q = EmbeddedQueue::open(&path, never.clone()).unwrap();
    fill(&q, 10).await;
    let tokens = lease_tokens(&q, 10).await;
    q.ack(&tokens).await.unwrap();
    q.close().await.unwrap();

    let reopened = EmbeddedQueue::open(&path, never).unwrap();
    assert!(all_ids(&reopened).await.is_empty());
}

#[tokio::test]
async fn zero_ack_sync_makes_every_ack_durable_before_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let q =
        EmbeddedQueue::open(&path, EmbeddedOptions::new().with_ack_sync(Duration::ZERO)).unwrap();
    fill(&q, 10).await;
    let tokens = lease_tokens(&q, 10).await;
    let syncs = q.stats().syncs;
    q.ack(&tokens).await.unwrap();
    assert!(q.stats().syncs > syncs);

    let reopened = open_crashed_copy(dir.path(), &path);
    assert!(all_ids(&reopened).await.is_empty());
    drop(q);
}

/// The writer is a thread on the real clock, so this waits (bounded) in real time.
#[tokio::test]
async fn an_idle_queue_syncs_its_acks_once_ack_sync_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let q = EmbeddedQueue::open(
        &path,
        EmbeddedOptions::new().with_ack_sync(Duration::from_millis(20)),
    )
    .unwrap();
    fill(&q, 10).await;
    let tokens = lease_tokens(&q, 10).await;
    let syncs = q.stats().syncs;
    q.ack(&tokens).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while q.stats().syncs == syncs {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no sync 10 s after the ack"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reopened = open_crashed_copy(dir.path(), &path);
    assert!(all_ids(&reopened).await.is_empty());
    drop(q);
}

/// Leases commit without an fsync (module docs of the embedded queue): a crash right
/// after them must lose no message — it comes back as if its lease had expired.
#[tokio::test]
async fn a_crash_after_unsynced_leases_loses_no_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
    let ids = fill(&q, 40).await;
    let now = SystemTime::now();
    assert_eq!(q.lease(25, LEASE, now).await.unwrap().len(), 25);
    assert_eq!(q.lease(25, LEASE, now).await.unwrap().len(), 15);

    let reopened = open_crashed_copy(dir.path(), &path);
    // `all_ids` leases everything far in the future: every message is deliverable again.
    assert_eq!(all_ids(&reopened).await, ids);
    drop(q);
}

/// Leases are not kept across a reopen (module docs of the embedded queue): messages
/// in flight are pending again at once, with their attempts counted.
#[tokio::test]
async fn leased_messages_are_pending_again_after_reopen_with_their_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
    let ids = fill(&q, 3).await;
    let now = SystemTime::now();
    assert_eq!(q.lease(10, LEASE, now).await.unwrap().len(), 3);
    q.close().await.unwrap();

    let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
    let back = q.lease(10, LEASE, now).await.unwrap();
    assert_eq!(
        back.iter().map(|l| l.envelope.id).collect::<BTreeSet<_>>(),
        ids
    );
    assert!(back.iter().all(|l| l.envelope.attempts == 2));
}

#[tokio::test]
async fn release_returns_a_message_without_counting_the_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let q = EmbeddedQueue::open(dir.path().join("q.redb"), EmbeddedOptions::new()).unwrap();
    fill(&q, 1).await;
    let now = SystemTime::now();
    let first = q.lease(1, LEASE, now).await.unwrap();
    assert_eq!(first[0].envelope.attempts, 1);
    q.release(first[0].token, now).await.unwrap();
    let again = q.lease(1, LEASE, now).await.unwrap();
    assert_eq!(
        again[0].envelope.attempts, 1,
        "the released delivery is not counted"
    );
    assert!(again[0].token.generation > first[0].token.generation);
    assert!(matches!(
        q.ack(&[first[0].token]).await,
        Err(QueueError::LeaseLost(_))
    ));
    q.ack(&[again[0].token]).await.unwrap();
}

/// Acks remove a batch in one ordered pass per table (module docs): every other
/// message of a run is acked, the ones between stay, keys of acked ones are freed.
#[tokio::test]
async fn a_batched_ack_removes_exactly_the_acked_messages() {
    let dir = tempfile::tempdir().unwrap();
    let q = EmbeddedQueue::open(dir.path().join("q.redb"), EmbeddedOptions::new()).unwrap();
    let envs: Vec<Envelope> = (0..50).map(envelope).collect();
    for e in &envs {
        q.enqueue(e.clone()).await.unwrap();
    }
    let now = SystemTime::now();
    let leased = q.lease(50, LEASE, now).await.unwrap();
    let (acked, kept): (Vec<_>, Vec<_>) = leased.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let tokens: Vec<_> = acked.iter().map(|(_, l)| l.token).collect();
    q.ack(&tokens).await.unwrap();
    assert_eq!(
        q.depth().await.unwrap(),
        Depth {
            pending: 0,
            in_flight: 25,
            dead: 0
        }
    );
    // An acked message's key is free again; a kept one's is still taken.
    let (_, first) = acked[0];
    let (_, second) = kept[0];
    let again = |l: &postbox::queue::Leased| {
        let mut e = envelope(99);
        e.idempotency_key = l.envelope.idempotency_key.clone();
        e
    };
    assert!(matches!(
        q.enqueue(again(first)).await.unwrap(),
        postbox::queue::Enqueued::Stored(_)
    ));
    assert!(matches!(
        q.enqueue(again(second)).await.unwrap(),
        postbox::queue::Enqueued::Duplicate(_)
    ));
    let rest: Vec<_> = kept.iter().map(|(_, l)| l.token).collect();
    q.ack(&rest).await.unwrap();
    assert!(matches!(
        q.ack(&tokens[..1]).await,
        Err(QueueError::LeaseLost(_))
    ));
    assert_eq!(q.depth().await.unwrap().in_flight, 0);
    assert_eq!(q.depth().await.unwrap().pending, 1);
}

#[tokio::test]
async fn expired_leases_come_back_with_their_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let q = EmbeddedQueue::open(dir.path().join("q.redb"), EmbeddedOptions::new()).unwrap();
    let ids = fill(&q, 3).await;
    let now = SystemTime::now();
    assert_eq!(q.lease(10, LEASE, now).await.unwrap().len(), 3);
    assert!(
        q.lease(10, LEASE, now + LEASE / 2)
            .await
            .unwrap()
            .is_empty()
    );
    fill(&q, 2).await;
    // The expired ones come back first (lowest ids), then the newer ones.
    let back = q.lease(10, LEASE, now + LEASE).await.unwrap();
    assert_eq!(back.len(), 5);
    let first: BTreeSet<_> = back[..3].iter().map(|l| l.envelope.id).collect();
    assert_eq!(first, ids);
    assert!(back[..3].iter().all(|l| l.envelope.attempts == 2));
    assert!(back[3..].iter().all(|l| l.envelope.attempts == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let q =
        Arc::new(EmbeddedQueue::open(dir.path().join("q.redb"), EmbeddedOptions::new()).unwrap());
    let before = q.stats();
    // All in flight at once (a task each): a loaded machine that runs the callers of a
    // few at a time leaves the writer little to group.
    let tasks: Vec<_> = (0..640)
        .map(|i| {
            let q = q.clone();
            tokio::spawn(async move { q.enqueue(envelope(i)).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let after = q.stats();
    let commits = after.commits - before.commits;
    assert_eq!(after.operations - before.operations, 640);
    eprintln!("640 enqueues from 640 tasks: {commits} commits");
    assert!(
        commits < 640 / 4,
        "group commit: {commits} commits for 640 enqueues"
    );
    // Reads and empty leases write nothing, so they cost no commit.
    q.lease(10, LEASE, SystemTime::UNIX_EPOCH).await.unwrap(); // reorders the index once
    let idle = q.stats().commits;
    q.depth().await.unwrap();
    q.lease(10, LEASE, SystemTime::UNIX_EPOCH).await.unwrap();
    assert_eq!(q.stats().commits, idle);
}

#[tokio::test]
async fn the_same_message_enqueued_twice_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let q = EmbeddedQueue::open(dir.path().join("q.redb"), EmbeddedOptions::new()).unwrap();
    let mut first = envelope(1);
    first.idempotency_key = String::new(); // never de-duplicated by key: by id only
    let id = first.id;
    assert_eq!(
        q.enqueue(first.clone()).await.unwrap(),
        postbox::queue::Enqueued::Stored(id)
    );
    // The same id again, with another body and a key of its own: the stored message
    // is kept as it was, and the new key is not taken.
    let mut again = first.clone();
    again.body = Bytes::from_static(b"other");
    again.idempotency_key = "k-new".into();
    assert_eq!(
        q.enqueue(again).await.unwrap(),
        postbox::queue::Enqueued::Duplicate(id)
    );
    let mut keyed = envelope(2);
    keyed.idempotency_key = "k-new".into();
    assert!(matches!(
        q.enqueue(keyed).await.unwrap(),
        postbox::queue::Enqueued::Stored(_)
    ));
    let leased = q.lease(10, LEASE, SystemTime::now()).await.unwrap();
    assert_eq!(leased.len(), 2);
    assert_eq!(leased[0].envelope.id, id);
    assert_eq!(
        leased[0].envelope.body, first.body,
        "the first copy is kept"
    );
    assert_eq!(leased[0].envelope.idempotency_key, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_close_racing_64_producers_keeps_every_receipted_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    for round in 0..5 {
        let q = Arc::new(EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap());
        let before = all_ids(&q).await;
        // Counted before the producers start: a loaded machine may let them run far
        // before this task reads the count.
        let base = q.stats().operations;
        let tasks: Vec<_> = (0..64)
            .map(|t| {
                let q = q.clone();
                tokio::spawn(async move {
                    let mut stored = Vec::new();
                    for i in 0..50 {
                        match q.enqueue(envelope(t * 50 + i)).await {
                            Ok(receipt) => stored.push(receipt.id()),
                            Err(_) => break, // closed: nothing after it is stored
                        }
                    }
                    stored
                })
            })
            .collect();
        // Close while the producers are busy (the writer takes arrivals into the
        // transaction it is applying, a close among them included).
        let target = base + 100 + round * 600;
        let started = tokio::time::Instant::now();
        while q.stats().operations < target && !tasks.iter().all(|t| t.is_finished()) {
            // Real time (the writer is a thread): bounded, so a stalled writer fails
            // the test instead of hanging it.
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the writer stalled"
            );
            tokio::task::yield_now().await;
        }
        q.close().await.unwrap();
        let mut receipted = BTreeSet::new();
        for t in tasks {
            receipted.extend(t.await.unwrap());
        }
        assert!(q.enqueue(envelope(0)).await.is_err(), "closed");
        drop(q);
        let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
        let after = all_ids(&q).await;
        let new: BTreeSet<_> = after.difference(&before).copied().collect();
        assert_eq!(
            new, receipted,
            "round {round}: stored exactly the receipted"
        );
        q.close().await.unwrap();
    }
}

#[tokio::test]
async fn opening_a_queue_twice_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let _q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
    let err = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap_err();
    assert!(matches!(err, QueueError::Backend(_)), "{err}");
}

// === damaged files ===

fn open_err(path: &Path) -> QueueError {
    match EmbeddedQueue::open(path, EmbeddedOptions::new()) {
        Ok(_) => panic!("opened a damaged file"),
        Err(e) => e,
    }
}

#[test]
fn garbage_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let mut rng = fastrand::Rng::with_seed(7);
    let garbage: Vec<u8> = (0..64 * 1024).map(|_| rng.u8(..)).collect();
    std::fs::write(&path, garbage).unwrap();
    let err = open_err(&path);
    assert!(
        matches!(err, QueueError::Corrupt(_) | QueueError::Backend(_)),
        "{err}"
    );
    eprintln!("garbage file: {err}");
}

#[test]
fn foreign_text_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    std::fs::write(&path, "not a database\n".repeat(1000)).unwrap();
    let err = open_err(&path);
    assert!(matches!(err, QueueError::Corrupt(_)), "{err}");
    eprintln!("text file: {err}");
}

async fn populated(path: &Path) {
    let q = EmbeddedQueue::open(path, EmbeddedOptions::new()).unwrap();
    fill(&q, 200).await;
    q.close().await.unwrap();
}

#[tokio::test]
async fn truncated_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    populated(&path).await;
    let len = std::fs::metadata(&path).unwrap().len();
    for cut in [len / 2, len / 4, 100, 10] {
        let copy = dir.path().join(format!("cut-{cut}.redb"));
        std::fs::copy(&path, &copy).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let err = open_err(&copy);
        assert!(matches!(err, QueueError::Corrupt(_)), "{err}");
        eprintln!("truncated to {cut} of {len}: {err}");
    }
}

#[tokio::test]
async fn corrupted_pages_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    populated(&path).await;
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    // Scribble over the middle of the file, where the message pages are.
    for b in &mut bytes[len / 3..len / 3 + 8192] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, bytes).unwrap();
    let err = open_err(&path);
    assert!(matches!(err, QueueError::Corrupt(_)), "{err}");
    eprintln!("corrupted pages: {err}");
}

// === SIGKILL while 64 tasks enqueue ===

/// The child: 64 tasks enqueue forever, printing each receipt's id once `enqueue`
/// returned. Run only by the parent test (`--ignored`, with `CHILD_ENV` set).
#[test]
#[ignore = "the child process of the crash test; run by it"]
fn child_enqueuer() {
    // Run with `--ignored` but not by the crash test: nothing to do.
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let q = Arc::new(EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap());
        let mut tasks = Vec::new();
        for t in 0..64 {
            let q = q.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let id = q.enqueue(envelope(t * 1_000_000 + i)).await.unwrap().id();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ID {id}").unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[tokio::test]
async fn sigkill_during_64_producers_loses_no_acknowledged_message() {
    const KILL_AFTER: usize = 3000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_enqueuer",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut printed = BTreeSet::new();
    let mut killed = false;
    // Bounded polling of the child: at most 120 s without a line fails the test.
    loop {
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!(
                    "child printed nothing for 120 s ({} ids so far)",
                    printed.len()
                );
            }
        };
        if let Some(id) = line.strip_prefix("ID ") {
            printed.insert(id.parse::<MessageId>().unwrap());
        }
        if !killed && printed.len() >= KILL_AFTER {
            child.kill().unwrap(); // SIGKILL
            killed = true;
        }
    }
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(killed, "the child ended on its own: {status:?}");
    assert!(!status.success());

    let q = EmbeddedQueue::open(&path, EmbeddedOptions::new()).unwrap();
    let stored = all_ids(&q).await;
    let lost: Vec<_> = printed.difference(&stored).collect();
    eprintln!(
        "receipts printed: {}, messages stored: {}",
        printed.len(),
        stored.len()
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    assert!(stored.len() >= printed.len());
}

/// A sync that is due is made even while reads arrive without a pause: a batch of reads
/// alone commits nothing to carry it, and the idle timer fires only once the queue has
/// nothing waiting. (Reads held it off until they stopped.) The writer is a thread on
/// the real clock: `ack_sync` is 1 ms, far less than 10 000 reads take. On a loaded
/// machine the idle timer may make the lease's sync before the reads are sent: that run
/// shows nothing, and the check is run again (inconclusive after 10 such runs).
#[tokio::test]
async fn reads_without_a_pause_do_not_hold_off_a_due_sync() {
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.redb");
        let q = EmbeddedQueue::open(
            &path,
            EmbeddedOptions::new().with_ack_sync(Duration::from_millis(1)),
        )
        .unwrap();
        fill(&q, 1).await;
        // A first delivery's lease commits without an fsync.
        let syncs = q.stats().syncs;
        assert_eq!(q.lease(1, LEASE, SystemTime::now()).await.unwrap().len(), 1);
        // Every read is sent when it is made: the writer has them all waiting.
        let reads: Vec<_> = (0..20_000).map(|_| q.depth()).collect();
        if q.stats().syncs != syncs {
            // The lease's sync was made before the reads were sent.
            continue;
        }
        let since = tokio::time::Instant::now();
        let mut reads = reads.into_iter();
        for read in reads.by_ref().take(10_000) {
            read.await.unwrap();
        }
        assert!(since.elapsed() > Duration::from_millis(1));
        assert!(
            q.stats().syncs > syncs,
            "no sync while 10 000 reads were still waiting"
        );
        for read in reads {
            read.await.unwrap();
        }
        drop(q);
        return;
    }
    panic!("inconclusive: the lease's sync was made before the reads, 10 times");
}
