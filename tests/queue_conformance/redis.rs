//! The conformance suite against the Redis server on loopback (`POSTBOX_REDIS_URL`,
//! default `redis://127.0.0.1:6379/`), plus connection-loss tests. Each test uses its
//! own queue name and purges its keys afterwards. An unreachable server fails the test.

use crate::broker::{PrivateServer, Redelivery::ExactlyOnce};
use postbox::queue::{Enqueued, Queue, QueueError, RedisOptions, RedisQueue};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// Purges the queue's keys when the test ends.
pub struct Purge(RedisQueue);

impl Drop for Purge {
    fn drop(&mut self) {
        let q = self.0.clone();
        let _ = crate::broker::block_on(q.purge());
    }
}

fn options() -> RedisOptions {
    RedisOptions::new(format!("test-{:016x}", fastrand::u64(..)))
}

async fn connect(options: RedisOptions) -> RedisQueue {
    let url = options.url();
    crate::broker::connect_patiently(
        "Redis",
        &url,
        "Start it (see shared/services.md: \
             redis-server on 127.0.0.1:6379) or point POSTBOX_REDIS_URL at one.",
        || RedisQueue::connect(options.clone()),
    )
    .await
}

fn make(options: RedisOptions) -> (RedisQueue, Purge) {
    let q = crate::broker::block_on(connect(options));
    (q.clone(), Purge(q))
}

crate::conformance!(|| make(options()), |capacity| make(
    options().with_capacity(capacity)
));

/// Kills the queue's own connection from a second client (only that one: other users of
/// the server are not touched).
/// Kills `q`'s connection from `admin`; whether one was killed (not if it was already
/// down).
async fn kill_connection(q: &RedisQueue, admin: &mut redis::aio::MultiplexedConnection) -> bool {
    let Ok(id) = redis::cmd("CLIENT")
        .arg("ID")
        .query_async::<i64>(&mut q.connection())
        .await
    else {
        return false; // already disconnected
    };
    let killed: redis::RedisResult<i64> = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(admin)
        .await;
    matches!(killed, Ok(1))
}

async fn admin() -> redis::aio::MultiplexedConnection {
    let url = options().url();
    redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis is not reachable at {url}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connection_is_unavailable_then_reconnects() {
    let (q, _purge) = make(options());
    let mut admin = admin().await;
    q.enqueue(crate::suite::envelope("before")).await.unwrap();
    assert!(
        kill_connection(&q, &mut admin).await,
        "the connection was not killed"
    );
    // The first call after the kill may fail, and then only as `Unavailable`.
    let mut saw_unavailable = false;
    let mut ok = false;
    for _ in 0..50 {
        match q.depth().await {
            Ok(d) => {
                assert_eq!(d.pending, 1);
                ok = true;
                break;
            }
            Err(QueueError::Unavailable(_)) => saw_unavailable = true,
            Err(e) => panic!("expected Unavailable, got {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "did not reconnect (saw Unavailable: {saw_unavailable})");
    q.enqueue(crate::suite::envelope("after")).await.unwrap();
    assert_eq!(q.depth().await.unwrap().pending, 2);
}

/// 8 producers enqueue while the connection is killed again and again; every enqueue
/// that returned `Ok` is stored, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_connection_drops() {
    let (q, _purge) = make(options());
    let q = Arc::new(q);
    let (victim, admin) = (q.clone(), admin().await);
    let kills = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let killed = kills.clone();
    let acked = crate::broker::enqueue_while_cut(
        q.clone(),
        Arc::new(move || {
            let (q, mut admin, killed) = (victim.clone(), admin.clone(), killed.clone());
            Box::pin(async move {
                if kill_connection(&q, &mut admin).await {
                    killed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        }),
    )
    .await;
    let kills = kills.load(std::sync::atomic::Ordering::Relaxed);
    assert!(kills > 0, "no connection was killed");
    // The last kill may still be pending: the next call can fail once, as Unavailable.
    let mut leased = None;
    for _ in 0..50 {
        match q
            .lease(1000, Duration::from_secs(30), crate::suite::at(0))
            .await
        {
            Ok(l) => {
                leased = Some(l);
                break;
            }
            Err(QueueError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    let leased = leased.expect("reconnected");
    let stored: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
    let unique: HashSet<_> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "a message stored twice");
    for id in &acked {
        assert!(unique.contains(id), "acknowledged message {id} lost");
    }
    assert_eq!(stored.len(), 400);
    eprintln!("{kills} connections killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_reads_the_stream_fields() {
    let (q, _purge) = make(options());
    let e = crate::suite::envelope("plain");
    assert!(matches!(
        q.enqueue(e.clone()).await.unwrap(),
        Enqueued::Stored(_)
    ));
    let mut admin = admin().await;
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&q.keys()[0])
        .arg("-")
        .arg("+")
        .query_async(&mut admin)
        .await
        .unwrap();
    let entry = &reply.ids[0];
    let field = |k: &str| -> Vec<u8> { redis::from_redis_value_ref(&entry.map[k]).unwrap() };
    assert_eq!(field("id"), e.id.to_string().into_bytes());
    assert_eq!(field("idempotency_key"), b"plain");
    assert_eq!(field("destination"), b"api:443");
    assert_eq!(
        postbox::queue::Envelope::decode(&field("envelope")).unwrap(),
        e
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_lease_does_not_expire() {
    let (q, _purge) = make(options());
    crate::suite::endless_lease_does_not_expire(q).await;
}

async fn stream_len(q: &RedisQueue) -> u64 {
    redis::cmd("XLEN")
        .arg(&q.keys()[0])
        .query_async(&mut q.connection())
        .await
        .unwrap()
}

/// Enqueues of one key sent in one batch: one is stored, the rest are answered with its
/// id, and their entries are gone from the stream before the answers arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_leave_one_entry() {
    let (q, _purge) = make(options());
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.enqueue(crate::suite::envelope("same")).await.unwrap()
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let stored: Vec<_> = answers
        .iter()
        .filter(|a| matches!(a, Enqueued::Stored(_)))
        .collect();
    assert_eq!(stored.len(), 1, "{answers:?}");
    let id = stored[0].id();
    assert!(answers.iter().all(|a| a.id() == id), "{answers:?}");
    assert_eq!(stream_len(&q).await, 1);
    assert_eq!(q.depth().await.unwrap().pending, 1);
    let leased = q
        .lease(100, Duration::from_secs(30), crate::suite::at(0))
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].envelope.id, id);
}

/// An entry left behind by a duplicate (its key belongs to another id), or a second entry
/// of a live id, is deleted by `lease` and never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_duplicate_entries_are_never_delivered() {
    let (q, _purge) = make(options());
    let e = crate::suite::envelope("owned");
    let id = q.enqueue(e.clone()).await.unwrap().id();
    let other = crate::suite::envelope("owned");
    let mut admin = admin().await;
    for (entry_id, key) in [(other.id, "owned"), (id, "owned")] {
        let _: String = redis::cmd("XADD")
            .arg(&q.keys()[0])
            .arg("*")
            .arg("id")
            .arg(entry_id.to_string())
            .arg("idempotency_key")
            .arg(key)
            .arg("envelope")
            .arg(other.encode())
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    assert_eq!(stream_len(&q).await, 3);
    let leased = q
        .lease(100, Duration::from_secs(30), crate::suite::at(0))
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].envelope, {
        let mut e = e;
        e.attempts = 1;
        e
    });
    assert_eq!(stream_len(&q).await, 1);
    q.ack(&[leased[0].token]).await.unwrap();
    assert_eq!(stream_len(&q).await, 0);
    assert!(
        q.lease(100, Duration::from_secs(30), crate::suite::at(3600))
            .await
            .unwrap()
            .is_empty()
    );
}

/// An entry written by hand with no `idempotency_key` field at all is leased, acked
/// and dead-lettered like any other (the missing field made every script that frees a
/// key fail, so the entry came back after every lease, and each dead letter of it was
/// stored again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_without_a_key_field_can_be_acked_and_dead_lettered() {
    let (q, _purge) = make(options());
    let mut admin = admin().await;
    let (acked, dead) = (
        crate::suite::envelope("ignored"),
        crate::suite::envelope("ignored"),
    );
    for e in [&acked, &dead] {
        let _: String = redis::cmd("XADD")
            .arg(&q.keys()[0])
            .arg("*")
            .arg("id")
            .arg(e.id.to_string())
            .arg("envelope")
            .arg(e.encode())
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let leased = q
        .lease(10, Duration::from_secs(30), crate::suite::at(0))
        .await
        .unwrap();
    assert_eq!(leased.len(), 2);
    q.ack(&[leased[0].token]).await.unwrap();
    q.dead_letter(leased[1].token, "given up").await.unwrap();
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.pending, depth.in_flight, depth.dead), (0, 0, 1));
}

/// An entry whose key nobody claims (written by hand, or by an older postbox whose
/// enqueue could die between its `XADD` and `HSETNX`) is claimed by `lease` and
/// delivered; the key then de-duplicates as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_enqueue_died_before_claiming_its_key_is_delivered() {
    let (q, _purge) = make(options());
    let e = crate::suite::envelope("unclaimed");
    let mut admin = admin().await;
    let _: String = redis::cmd("XADD")
        .arg(&q.keys()[0])
        .arg("*")
        .arg("id")
        .arg(e.id.to_string())
        .arg("idempotency_key")
        .arg("unclaimed")
        .arg("envelope")
        .arg(e.encode())
        .query_async(&mut admin)
        .await
        .unwrap();
    let leased = q
        .lease(100, Duration::from_secs(30), crate::suite::at(0))
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].envelope.id, e.id);
    assert_eq!(
        q.enqueue(crate::suite::envelope("unclaimed"))
            .await
            .unwrap(),
        Enqueued::Duplicate(e.id)
    );
    assert_eq!(stream_len(&q).await, 1, "the duplicate's entry was dropped");
    q.ack(&[leased[0].token]).await.unwrap();
    assert_eq!(stream_len(&q).await, 0);
}

/// A private `redis-server` with `appendfsync always` (see [`PrivateServer`]).
fn private_redis(port: u16, dir: &Path) -> Command {
    let mut c = Command::new("redis-server");
    c.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir);
    c
}

/// Waits until the private server answers `PING` (not only accepts: it may be loading
/// its append-only file).
async fn answering(url: &str, port: u16) {
    let client = redis::Client::open(url).unwrap();
    for _ in 0..100 {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the private redis-server on port {port} did not answer");
}

/// 8 producers enqueue into a private server with `appendfsync always` while it is
/// killed (SIGKILL) and restarted twice; every enqueue that returned `Ok` is there after
/// the restarts, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_server_is_killed_and_restarted() {
    let mut server = PrivateServer::start(private_redis);
    let port = server.port();
    let url = format!("redis://127.0.0.1:{port}/");
    answering(&url, port).await;
    let options = options()
        .with_url(&url)
        .with_response_timeout(Duration::from_millis(500));
    let q = Arc::new(RedisQueue::connect(options).await.unwrap());
    crate::broker::nothing_acknowledged_is_lost_across_restarts(q, ExactlyOnce, async || {
        server.kill();
        server.spawn();
        answering(&url, port).await;
    })
    .await;
}

/// A server out of memory (`maxmemory` reached, `noeviction`) refuses an enqueue's
/// transaction whole (`EXECABORT`): the enqueue is `Unavailable`, to be tried again, and
/// an enqueue retried for a message already stored frees no key — the stored message is
/// still delivered, once, when the server has room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_refused_for_memory_is_unavailable_and_loses_no_stored_message() {
    let server = PrivateServer::start(private_redis);
    let port = server.port();
    let url = format!("redis://127.0.0.1:{port}/");
    answering(&url, port).await;
    let q = RedisQueue::connect(options().with_url(&url)).await.unwrap();
    let e = crate::suite::envelope("kept");
    let id = q.enqueue(e.clone()).await.unwrap().id();
    let maxmemory = |bytes: &'static str| {
        let mut admin = q.connection();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg(bytes)
                .query_async(&mut admin)
                .await
                .unwrap();
        }
    };
    maxmemory("1").await;
    for again in [e.clone(), crate::suite::envelope("new")] {
        let refused = q.enqueue(again).await;
        assert!(
            matches!(refused, Err(QueueError::Unavailable(_))),
            "{refused:?}"
        );
    }
    maxmemory("0").await;
    let lease_for = Duration::from_secs(30);
    let leased = q.lease(10, lease_for, crate::suite::at(0)).await.unwrap();
    let ids: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![id], "the stored message was deleted");
    q.ack(&[leased[0].token]).await.unwrap();
    assert_eq!(q.depth().await.unwrap().pending, 0);
}

/// A server whose `maxmemory-policy` may evict any key (`allkeys-*`) would drop the
/// queue's keys, which have no expiry, with the acknowledged messages they hold once its
/// memory is full: `connect` refuses it, naming the setting. `noeviction` (the default)
/// and a `volatile-*` policy, which evicts only keys with an expiry, are taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_may_evict_the_queues_keys_is_refused() {
    let server = PrivateServer::start(private_redis);
    let port = server.port();
    let url = format!("redis://127.0.0.1:{port}/");
    answering(&url, port).await;
    let q = RedisQueue::connect(options().with_url(&url)).await.unwrap();
    let policy = |name: &'static str| {
        let mut admin = q.connection();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory-policy")
                .arg(name)
                .query_async(&mut admin)
                .await
                .unwrap();
        }
    };
    for evicting in ["allkeys-lru", "allkeys-random"] {
        policy(evicting).await;
        match RedisQueue::connect(options().with_url(&url)).await {
            Err(QueueError::Backend(e)) => {
                assert!(e.to_string().contains("maxmemory-policy"), "{e}");
            }
            other => panic!("{evicting}: connected: {:?}", other.map(|_| ())),
        }
    }
    for kept in ["volatile-lru", "noeviction"] {
        policy(kept).await;
        RedisQueue::connect(options().with_url(&url))
            .await
            .unwrap_or_else(|e| panic!("{kept}: {e}"));
    }
}

/// A capacity of 0 holds no message, as in the memory and embedded queues (it was taken
/// for no limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_of_zero_holds_nothing() {
    let (q, _purge) = make(options().with_capacity(0));
    let full = q.enqueue(crate::suite::envelope("a")).await;
    assert!(
        matches!(full, Err(QueueError::Full { capacity: 0 })),
        "{full:?}"
    );
    assert_eq!(q.depth().await.unwrap().pending, 0);
}

async fn add_raw(q: &RedisQueue, id: &str, key: &str, envelope: &[u8]) {
    let _: String = redis::cmd("XADD")
        .arg(&q.keys()[0])
        .arg("*")
        .arg("id")
        .arg(id)
        .arg("idempotency_key")
        .arg(key)
        .arg("envelope")
        .arg(envelope)
        .query_async(&mut q.connection())
        .await
        .unwrap();
}

async fn exists(q: &RedisQueue, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(&mut q.connection())
        .await
        .unwrap()
        == 1
}

/// A second entry of a message (an enqueue retried after its reply was lost can leave
/// one) still unread when the first is acked is deleted by `lease`, not delivered again;
/// and the bookkeeping that guards it is gone once the stream has been read past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_an_acked_message_is_not_delivered_again() {
    let (q, _purge) = make(options());
    let e = crate::suite::envelope("copied");
    let id = q.enqueue(e.clone()).await.unwrap().id();
    let later = q
        .enqueue(crate::suite::envelope("later"))
        .await
        .unwrap()
        .id();
    add_raw(&q, &id.to_string(), "copied", &e.encode()).await;
    // Two: the copy, newest, is still unread when both are acked.
    let lease_for = Duration::from_secs(30);
    let leased = q.lease(2, lease_for, crate::suite::at(0)).await.unwrap();
    let ids: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![id, later]);
    let tokens: Vec<_> = leased.iter().map(|l| l.token).collect();
    q.ack(&tokens).await.unwrap();
    let again = q
        .lease(10, lease_for, crate::suite::at(3600))
        .await
        .unwrap();
    assert!(again.is_empty(), "the copy was delivered: {again:?}");
    assert_eq!(stream_len(&q).await, 0);
    assert!(
        !exists(&q, &q.keys()[9]).await,
        "the guard outlived the copy"
    );
}

/// A stream entry whose envelope cannot be decoded goes to the dead-letter stream when it
/// is leased; the rest of the batch is leased as usual, and its key is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_entry_is_dead_lettered_and_the_batch_goes_on() {
    let (q, _purge) = make(options());
    let bad = crate::suite::envelope("bad");
    add_raw(&q, &bad.id.to_string(), "bad", b"PBOX\x63garbage").await;
    let good = crate::suite::only_the_good_message_is_leased(&q).await;
    let lease_for = Duration::from_secs(30);
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.pending, depth.in_flight, depth.dead), (0, 1, 1));
    // Skipped when listing (it cannot be decoded), not an error for the others.
    assert!(q.dead_letters(10).await.unwrap().is_empty());
    // The good message's lease has expired by then: it comes back, alone.
    let ids: Vec<_> = q
        .lease(10, lease_for, crate::suite::at(3600))
        .await
        .unwrap()
        .iter()
        .map(|l| l.envelope.id)
        .collect();
    assert_eq!(ids, vec![good]);
    let again = q.enqueue(crate::suite::envelope("bad")).await.unwrap();
    assert!(matches!(again, Enqueued::Stored(_)), "{again:?}");
}

/// Dead letters that cannot be decoded at the head of the dead stream (entries set
/// aside, not written by postbox) do not count against `max`: a listing or redrive of
/// one gets past them, instead of finding nothing for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_dead_letters_at_the_head_do_not_stall_a_redrive() {
    let (q, _purge) = make(options());
    for i in 0..3 {
        let _: String = redis::cmd("XADD")
            .arg(&q.keys()[1])
            .arg("*")
            .arg("reason")
            .arg(format!("foreign {i}"))
            .query_async(&mut q.connection())
            .await
            .unwrap();
    }
    q.enqueue(crate::suite::envelope("real")).await.unwrap();
    let leased = q
        .lease(1, Duration::from_secs(30), crate::suite::at(3600))
        .await
        .unwrap();
    q.dead_letter(leased[0].token, "gave up").await.unwrap();
    let dead = q.dead_letters(1).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id, leased[0].envelope.id);
    assert_eq!(q.redrive_dead_letters(1).await.unwrap(), 1);
    assert_eq!(q.depth().await.unwrap().pending, 1);
}

/// A message whose entry is deleted by hand after `lease` read it, while it waits for
/// its not-before, frees its key when a later lease finds it gone: the next enqueue of
/// the key is stored, even with other entries unread (a busy stream), instead of being
/// answered as a duplicate of a message that no longer exists, and never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_message_deleted_by_hand_frees_its_key() {
    for read_by_an_older_postbox in [false, true] {
        a_waiting_message_deleted_by_hand_frees_its_key_once(read_by_an_older_postbox).await;
    }
}

/// With `read_by_an_older_postbox`, `lease` did not note the message's key when it read
/// the entry (as postbox before `…:idkeys` did), so it is found by a scan.
async fn a_waiting_message_deleted_by_hand_frees_its_key_once(read_by_an_older_postbox: bool) {
    let (q, _purge) = make(options());
    let lease_for = Duration::from_secs(30);
    let mut later = crate::suite::envelope("k");
    later.not_before = crate::suite::at(100);
    let gone = q.enqueue(later).await.unwrap().id();
    // Read into the bookkeeping, not yet due.
    assert!(
        q.lease(10, lease_for, crate::suite::at(0))
            .await
            .unwrap()
            .is_empty()
    );
    if read_by_an_older_postbox {
        let _: i64 = redis::cmd("HDEL")
            .arg(&q.keys()[10])
            .arg(gone.to_string())
            .query_async(&mut q.connection())
            .await
            .unwrap();
    }
    delete_by_hand(&q, gone).await;
    // Due now: the lease finds the entry gone.
    assert!(
        q.lease(10, lease_for, crate::suite::at(200))
            .await
            .unwrap()
            .is_empty()
    );
    // Another entry is unread, so the owner cannot be judged gone by the stream alone.
    q.enqueue(crate::suite::envelope("other")).await.unwrap();
    let again = q.enqueue(crate::suite::envelope("k")).await.unwrap();
    assert!(
        matches!(again, Enqueued::Stored(_)),
        "older: {read_by_an_older_postbox}, {again:?}"
    );
}

/// A leased message whose entry is deleted by hand, then acked or dead-lettered, frees
/// its key all the same (`lease` noted it when it read the entry): the next enqueue of
/// the key is stored, even with other entries unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_message_deleted_by_hand_frees_its_key_when_settled() {
    let (q, _purge) = make(options());
    let lease_for = Duration::from_secs(30);
    for dead in [false, true] {
        let gone = q.enqueue(crate::suite::envelope("k")).await.unwrap().id();
        let leased = q.lease(10, lease_for, crate::suite::at(0)).await.unwrap();
        assert_eq!(leased.len(), 1);
        delete_by_hand(&q, gone).await;
        if dead {
            q.dead_letter(leased[0].token, "gave up").await.unwrap();
        } else {
            q.ack(&[leased[0].token]).await.unwrap();
        }
        // Another entry is unread, so the owner cannot be judged gone by the stream.
        let other = crate::suite::envelope(if dead { "other-2" } else { "other-1" });
        q.enqueue(other).await.unwrap();
        let again = q.enqueue(crate::suite::envelope("k")).await.unwrap();
        assert!(
            matches!(again, Enqueued::Stored(_)),
            "dead: {dead}, {again:?}"
        );
        // Settle this round's messages before the next.
        let rest = q.lease(10, lease_for, crate::suite::at(0)).await.unwrap();
        let tokens: Vec<_> = rest.iter().map(|l| l.token).collect();
        q.ack(&tokens).await.unwrap();
    }
}

/// A duplicate's entry left in the stream (its enqueue failed after the `MULTI` that
/// wrote it and lost the key's claim, before it could delete it) is never delivered,
/// even once the key's owner was acked and the key is free: the entry says it was
/// written with a claim, so a free key means it lost it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_losing_duplicates_entry_left_behind_is_not_delivered_after_the_owner_finishes() {
    let (q, _purge) = make(options());
    let lease_for = Duration::from_secs(30);
    let owner = q.enqueue(crate::suite::envelope("k")).await.unwrap().id();
    // What the losing enqueue's `MULTI` leaves: its full entry, the key not claimed.
    let loser = crate::suite::envelope("k");
    let mut xadd = redis::cmd("XADD");
    xadd.arg(&q.keys()[0]).arg("*");
    for (k, v) in [
        ("id", loser.id.to_string().into_bytes()),
        ("idempotency_key", b"k".to_vec()),
        ("destination", b"api:443".to_vec()),
        ("method", b"POST".to_vec()),
        ("uri", b"https://api/orders".to_vec()),
        ("created_at_ms", b"0".to_vec()),
        ("not_before_ms", b"0".to_vec()),
        ("attempts", b"0".to_vec()),
        ("claim", b"1".to_vec()),
        ("envelope", loser.encode()),
    ] {
        xadd.arg(k).arg(v);
    }
    let _: String = xadd.query_async(&mut q.connection()).await.unwrap();
    // The owner alone is leased (lease(1): the loser's entry stays unread), then acked.
    let first = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].envelope.id, owner);
    q.ack(&[first[0].token]).await.unwrap();
    // The key is free now; the loser's entry must still not be delivered.
    let next = q.lease(10, lease_for, crate::suite::at(0)).await.unwrap();
    assert!(
        next.is_empty(),
        "{:?}",
        next.iter().map(|l| l.envelope.id).collect::<Vec<_>>()
    );
    assert_eq!(stream_len(&q).await, 0);
}

/// Stream entries as `XRANGE` returns them: (entry id, field/value pairs).
type Entries<V> = Vec<(String, Vec<(String, V)>)>;

/// Every entry of the stream `key`.
async fn xrange(q: &RedisQueue, key: &str) -> Entries<Vec<u8>> {
    redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut q.connection())
        .await
        .unwrap()
}

/// Deletes the stream entry of message `id` by hand, as an operator's `XDEL` or `XTRIM`
/// would.
async fn delete_by_hand(q: &RedisQueue, id: postbox::queue::MessageId) {
    let entries = xrange(q, &q.keys()[0]).await;
    let id = id.to_string();
    let (eid, _) = entries
        .iter()
        .find(|(_, fields)| fields.iter().any(|(k, v)| k == "id" && *v == id.as_bytes()))
        .expect("the message's entry");
    let _: i64 = redis::cmd("XDEL")
        .arg(&q.keys()[0])
        .arg(eid)
        .query_async(&mut q.connection())
        .await
        .unwrap();
}

/// The idempotency key of a message whose entry was deleted by hand (after `lease` read
/// it, or before) is not claimed forever: the next enqueue of that key is stored, with
/// and without a capacity (the two enqueue paths). One never read is judged gone only
/// once every other entry has been read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_entry_was_deleted_by_hand_is_taken_over() {
    for options in [options(), options().with_capacity(100)] {
        let (q, _purge) = make(options);
        let lease_for = Duration::from_secs(30);
        let stored = |e: Enqueued, key: &str| {
            assert!(matches!(e, Enqueued::Stored(_)), "{key}: {e:?}");
            e.id()
        };
        let read = q.enqueue(crate::suite::envelope("read")).await.unwrap();
        assert_eq!(
            q.lease(10, lease_for, crate::suite::at(0))
                .await
                .unwrap()
                .len(),
            1
        );
        delete_by_hand(&q, read.id()).await;
        let unread = q.enqueue(crate::suite::envelope("unread")).await.unwrap();
        delete_by_hand(&q, unread.id()).await;
        let read = stored(
            q.enqueue(crate::suite::envelope("read")).await.unwrap(),
            "read",
        );
        // The new "read" entry is unread: the "unread" owner could be behind it.
        let early = q.enqueue(crate::suite::envelope("unread")).await.unwrap();
        assert_eq!(early, Enqueued::Duplicate(unread.id()));
        assert_eq!(
            q.lease(10, lease_for, crate::suite::at(0))
                .await
                .unwrap()
                .len(),
            1
        );
        let unread = stored(
            q.enqueue(crate::suite::envelope("unread")).await.unwrap(),
            "unread",
        );
        for (key, id) in [("read", read), ("unread", unread)] {
            let duplicate = q.enqueue(crate::suite::envelope(key)).await.unwrap();
            assert_eq!(duplicate, Enqueued::Duplicate(id), "{key}");
        }
        let leased = q
            .lease(10, lease_for, crate::suite::at(3600))
            .await
            .unwrap();
        let mut ids: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
        ids.sort();
        assert_eq!(ids, vec![read, unread]);
    }
}

/// Entries that postbox did not write (no `id` field, one that is not a message id in
/// lowercase, or fields postbox never writes) go to the dead-letter stream when `lease` reads them:
/// they are not left counted as pending, they do not fail the batch (or strand the rest
/// of it), and listing the dead letters copes with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_not_written_by_postbox_is_dead_lettered() {
    let (q, _purge) = make(options());
    let valid = crate::suite::envelope("valid").encode();
    let (nan, huge) = (
        crate::suite::envelope("nan"),
        crate::suite::envelope("huge"),
    );
    let (nan_id, huge_id) = (nan.id.to_string(), huge.id.to_string());
    // Tokens name ids in lowercase: an uppercase one could never be acked.
    let upper_id = crate::suite::envelope("upper")
        .id
        .to_string()
        .to_uppercase();
    let zero_id = crate::suite::envelope("zero").id.to_string();
    let entries: [&[(&str, &[u8])]; 6] = [
        &[("note", b"hello")],
        &[("id", b"42"), ("note", b"x")],
        &[
            ("id", nan_id.as_bytes()),
            ("not_before_ms", b"nan"),
            ("envelope", &nan.encode()),
        ],
        &[
            ("id", huge_id.as_bytes()),
            ("attempts", b"99999999999"),
            ("envelope", &valid),
        ],
        &[("id", upper_id.as_bytes()), ("envelope", &valid)],
        // A leading zero: HINCRBY would refuse it mid-lease.
        &[
            ("id", zero_id.as_bytes()),
            ("attempts", b"01"),
            ("envelope", &valid),
        ],
    ];
    for fields in entries {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&q.keys()[0]).arg("*");
        for (k, v) in fields {
            xadd.arg(k).arg(v);
        }
        let _: String = xadd.query_async(&mut q.connection()).await.unwrap();
    }
    crate::suite::only_the_good_message_is_leased(&q).await;
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.pending, depth.in_flight, depth.dead), (0, 1, 6));
    let dead = xrange(&q, &q.keys()[1]).await;
    assert_eq!(dead[0].1[0], ("note".into(), b"hello".to_vec()));
    let reasons: Vec<_> = dead
        .iter()
        .map(|(_, f)| {
            let reason = f.iter().find(|(k, _)| k == "reason").expect("a reason");
            String::from_utf8_lossy(&reason.1).into_owned()
        })
        .collect();
    let why = |what: &str| format!("not a postbox entry: {what}");
    assert_eq!(
        reasons,
        [
            why("no message id"),
            why("no message id"),
            why("bad not_before_ms"),
            why("bad attempts"),
            why("no message id"),
            why("bad attempts"),
        ]
    );
    // The four with an envelope are listed, with their reasons.
    let listed = q.dead_letters(10).await.unwrap();
    let listed: Vec<_> = listed.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(
        listed,
        [
            why("bad not_before_ms"),
            why("bad attempts"),
            why("no message id"),
            why("bad attempts"),
        ]
    );
    // A field name that is not UTF-8, copied into the dead letters as it was, does not
    // fail the listing of the others.
    let _: String = redis::cmd("XADD")
        .arg(&q.keys()[0])
        .arg("*")
        .arg(&b"\xff\xfe"[..])
        .arg("x")
        .query_async(&mut q.connection())
        .await
        .unwrap();
    assert!(
        q.lease(10, Duration::from_secs(30), crate::suite::at(0))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(q.depth().await.unwrap().dead, 7);
    assert_eq!(q.dead_letters(10).await.unwrap().len(), 4);
}

/// An enqueue of a message already acked, retried after its reply was lost, claims the
/// key again. That claim does not outlive the finished message: an enqueue of the key
/// while the copy is unread takes the key over, and `lease` frees it when it deletes the
/// copy; the next message with the key is stored either way, not answered as a duplicate
/// of a finished one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_enqueue_of_a_finished_message_does_not_keep_its_key() {
    let (q, _purge) = make(options());
    let lease_for = Duration::from_secs(30);
    let (x1, x2) = (crate::suite::envelope("k1"), crate::suite::envelope("k2"));
    for x in [&x1, &x2] {
        assert_eq!(q.enqueue(x.clone()).await.unwrap(), Enqueued::Stored(x.id));
    }
    let other = q.enqueue(crate::suite::envelope("other")).await.unwrap();
    let leased = q.lease(2, lease_for, crate::suite::at(0)).await.unwrap();
    let tokens: Vec<_> = leased.iter().map(|l| l.token).collect();
    q.ack(&tokens).await.unwrap();
    // The retried enqueues: the same envelopes again, while "other" is still unread.
    for x in [&x1, &x2] {
        assert_eq!(q.enqueue(x.clone()).await.unwrap(), Enqueued::Stored(x.id));
    }
    let y1 = q.enqueue(crate::suite::envelope("k1")).await.unwrap();
    assert!(matches!(y1, Enqueued::Stored(_)), "{y1:?}");
    let leased = q.lease(10, lease_for, crate::suite::at(0)).await.unwrap();
    let ids: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![other.id(), y1.id()], "an acked message came back");
    let claim: Option<String> = redis::cmd("HGET")
        .arg(&q.keys()[5])
        .arg("k2")
        .query_async(&mut q.connection())
        .await
        .unwrap();
    assert_eq!(claim, None, "the finished message's key is still claimed");
    // Leave an unread entry, so the key is judged by the bookkeeping alone.
    let _ = q.enqueue(crate::suite::envelope("unread")).await.unwrap();
    let y2 = q.enqueue(crate::suite::envelope("k2")).await.unwrap();
    assert!(matches!(y2, Enqueued::Stored(_)), "{y2:?}");
}

/// A consumer group destroyed by hand is created again by `lease`, which reads every
/// entry again: the live messages are leased as before, not deleted as copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_reset_by_hand_loses_no_message() {
    let (q, _purge) = make(options());
    let lease_for = Duration::from_secs(30);
    let a = q.enqueue(crate::suite::envelope("a")).await.unwrap().id();
    let b = q.enqueue(crate::suite::envelope("b")).await.unwrap().id();
    let leased = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    assert_eq!(leased[0].envelope.id, a);
    let groups: Vec<Vec<redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&q.keys()[0])
        .query_async(&mut q.connection())
        .await
        .unwrap();
    let name = match &groups[0][1] {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("{other:?}"),
    };
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&q.keys()[0])
        .arg(name)
        .query_async(&mut q.connection())
        .await
        .unwrap();
    // `a`'s lease has expired by then: it is leased again first, while its entry is
    // not pending in the new group; then the entries are read again.
    let first = q.lease(1, lease_for, crate::suite::at(60)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].envelope.id, a);
    let rest = q.lease(10, lease_for, crate::suite::at(60)).await.unwrap();
    let ids: Vec<_> = rest.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![b]);
    q.ack(&[rest[0].token]).await.unwrap();
    // Reading `a`'s entry again left it alone: `a` comes back when its lease expires.
    let again = q.lease(10, lease_for, crate::suite::at(120)).await.unwrap();
    let ids: Vec<_> = again.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![a]);
    q.ack(&[again[0].token]).await.unwrap();
    assert_eq!(stream_len(&q).await, 0);
}

/// A not-before far in the future (as a huge `Retry-After` gives) is a valid entry: it
/// waits, it is not dead-lettered as a malformed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_not_before_waits_and_is_not_dead_lettered() {
    let (q, _purge) = make(options());
    let mut e = crate::suite::envelope("far");
    e.not_before = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(10u64.pow(15));
    q.enqueue(e).await.unwrap();
    let leased = q
        .lease(10, Duration::from_secs(30), crate::suite::at(0))
        .await
        .unwrap();
    assert!(leased.is_empty());
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.pending, depth.dead), (1, 0));
}

/// An enqueue whose answer timed out while Redis was busy, though its transaction then
/// ran: the message and its key's claim were written together, so the key is not freed
/// (which got the entry deleted by `lease` as a duplicate's, the message lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_that_timed_out_after_its_transaction_ran_keeps_its_message() {
    const BUSY_2_S: &str = "local t = redis.call('TIME') \
        local start = t[1] * 1000000 + t[2] \
        while true do \
          local n = redis.call('TIME') \
          if n[1] * 1000000 + n[2] - start > 2000000 then break end \
        end \
        return 0";
    // A server of its own: the script holds up every client of the server.
    let server = PrivateServer::start(private_redis);
    let port = server.port();
    let url = format!("redis://127.0.0.1:{port}/");
    answering(&url, port).await;
    let name = options().with_url(&url);
    let (q, _purge) = make(
        name.clone()
            .with_response_timeout(Duration::from_millis(100)),
    );
    let other = connect(name).await;
    let script = redis::Script::new(BUSY_2_S);
    let _: String = script
        .prepare_invoke()
        .load_async(&mut other.connection())
        .await
        .unwrap();
    // (Connected before the script runs: connecting sends commands too.)
    let mut probe = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut blocker = other.connection();
    let busy = tokio::spawn(async move {
        let done: redis::RedisResult<i64> = script.invoke_async(&mut blocker).await;
        done
    });
    // Until the script runs: a `PING` on a connection of its own (on the script's, it
    // would only wait behind it) is no longer answered.
    loop {
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut probe);
        if tokio::time::timeout(Duration::from_millis(300), ping)
            .await
            .is_err()
        {
            break;
        }
        assert!(!busy.is_finished(), "{:?}", busy.await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = crate::suite::envelope("k");
    let r = q.enqueue(e.clone()).await;
    assert!(matches!(r, Err(QueueError::Unavailable(_))), "{r:?}");
    busy.await.unwrap().unwrap();
    let again = other.enqueue(crate::suite::envelope("k")).await.unwrap();
    assert_eq!(again, Enqueued::Duplicate(e.id));
    let leased = other
        .lease(10, Duration::from_secs(30), crate::suite::at(0))
        .await
        .unwrap();
    let ids: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
    assert_eq!(
        ids,
        vec![e.id],
        "the message whose answer timed out is delivered"
    );
}

/// A backlog that falls due at once (an outage's retries, all due when the break
/// ends) is moved to `ready` a bounded batch per lease (1024, or `max` if more), not
/// whole inside one script that blocks Redis for every other client; every message is
/// still leased, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_falling_due_at_once_is_moved_a_bounded_batch_per_lease() {
    const N: usize = 3000;
    let (q, _purge) = make(options());
    let due = crate::suite::at(3600);
    let q = Arc::new(q);
    let mut producers = Vec::new();
    for p in 0..8 {
        let q = q.clone();
        producers.push(tokio::spawn(async move {
            for i in (p..N).step_by(8) {
                let mut e = crate::suite::envelope(&format!("k{i}"));
                e.not_before = due;
                q.enqueue(e).await.unwrap();
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    let delayed = || async {
        redis::cmd("ZCARD")
            .arg(&q.keys()[7])
            .query_async::<usize>(&mut q.connection())
            .await
            .unwrap()
    };
    let lease_for = Duration::from_secs(300);
    // Read into the delayed set before they are due.
    for _ in 0..100 {
        if delayed().await == N {
            break;
        }
        assert!(
            q.lease(64, lease_for, crate::suite::at(0))
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(delayed().await, N);
    let first = q.lease(10, lease_for, due).await.unwrap();
    assert_eq!(first.len(), 10);
    assert_eq!(delayed().await, N - 1024, "moved more than a batch at once");
    let mut seen: HashSet<_> = first.iter().map(|l| l.envelope.id).collect();
    loop {
        let got = q.lease(500, lease_for, due).await.unwrap();
        if got.is_empty() {
            break;
        }
        for l in got {
            assert!(seen.insert(l.envelope.id), "leased twice");
        }
    }
    assert_eq!(seen.len(), N);
}

/// See [`crate::suite::a_message_over_the_size_limit_is_refused`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_is_refused_and_the_connection_goes_on() {
    let (q, _purge) = make(options().with_max_message_size(2048));
    crate::suite::a_message_over_the_size_limit_is_refused(q, 2048).await;
}

/// Attempts saturate at `u32::MAX` instead of carrying into the lease generation's
/// release count: a message at the limit was handed back with `attempts = 0`, new
/// again. Each lease still has a generation of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_saturate_at_the_limit_and_each_lease_stays_distinct() {
    let (q, _purge) = make(options());
    let mut e = crate::suite::envelope("worn");
    e.attempts = u32::MAX - 1;
    q.enqueue(e).await.unwrap();
    let lease_for = Duration::from_secs(30);
    let first = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    assert_eq!(first[0].envelope.attempts, u32::MAX);
    q.retry_later(first[0].token, crate::suite::at(0))
        .await
        .unwrap();
    let second = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    assert_eq!(second[0].envelope.attempts, u32::MAX);
    assert_ne!(second[0].token, first[0].token);
    assert!(matches!(
        q.ack(&[first[0].token]).await,
        Err(QueueError::LeaseLost(_))
    ));
    q.ack(&[second[0].token]).await.unwrap();
}

/// Refused credentials or a database the server does not have are a configuration
/// error (`Backend`) at `connect`, not an outage to wait out; the password is not in
/// the error. (Both were `Unavailable`, which a caller tries again for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_or_database_are_a_configuration_error() {
    let url = options().url();
    let hostport = crate::proxy::host_port(&url);
    // Reachable first, so a failure below is not an outage.
    drop(connect(options()).await);
    for bad in [
        format!("redis://:wrong-pw-9@{hostport}/"),
        format!("redis://{hostport}/99999"),
    ] {
        let e = RedisQueue::connect(options().with_url(bad.clone()))
            .await
            .unwrap_err();
        assert!(matches!(e, QueueError::Backend(_)), "{bad}: {e}");
        assert!(!e.to_string().contains("wrong-pw-9"), "{e}");
    }
}

/// A message released more than 2^21 times (a destination held back for months) has a
/// lease generation past 2^53, which a Lua number no longer holds exactly. Each lease
/// is still current for its holder, and its attempts are right. (The generation came
/// back rounded: every settle was `LeaseLost`, and the message came back every
/// `lease_for`, for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_generation_past_2_to_the_53_stays_exact() {
    let (q, _purge) = make(options());
    let id = q
        .enqueue(crate::suite::envelope("held-back"))
        .await
        .unwrap()
        .id();
    let lease_for = Duration::from_secs(30);
    // Read once (its generation is kept from then on), then given back.
    let read = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    q.release(read[0].token, crate::suite::at(0)).await.unwrap();
    // 2^21 + 5 releases and 2 attempts: releases × 2^32 + attempts.
    let stored = ((1u64 << 21) + 5) * (1 << 32) + 2;
    let _: i64 = redis::cmd("HSET")
        .arg(&q.keys()[3])
        .arg(id.to_string())
        .arg(stored)
        .query_async(&mut q.connection())
        .await
        .unwrap();
    let first = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    assert_eq!(first[0].token.generation, stored + 1);
    assert_eq!(first[0].envelope.attempts, 3);
    q.release(first[0].token, crate::suite::at(0))
        .await
        .unwrap();
    let second = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    assert_eq!(second[0].token.generation, stored + 1 + (1 << 32));
    assert_eq!(second[0].envelope.attempts, 3, "a release is not counted");
    q.retry_later(second[0].token, crate::suite::at(0))
        .await
        .unwrap();
    let third = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    assert_eq!(third[0].envelope.attempts, 4);
    q.dead_letter(third[0].token, "gave up").await.unwrap();
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead[0].envelope.attempts, 4);
}

/// A server that stops answering without closing the connection (a host gone, a
/// partition; here the proxy freezes it): a call times out (`Unavailable`) and the
/// connection is made again, so calls succeed within seconds. Before, the
/// connection stayed open and every call timed out until the kernel gave up on the
/// socket (about 15 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_answering_is_made_again() {
    let proxy = crate::proxy::Proxy::start(crate::proxy::host_port(&options().url())).await;
    let (q, _purge) = make(
        options()
            .with_url(format!("redis://{}/", proxy.addr()))
            .with_response_timeout(Duration::from_millis(300)),
    );
    q.enqueue(crate::suite::envelope("before")).await.unwrap();
    let connections = proxy.accepted();
    proxy.freeze();
    let e = q
        .enqueue(crate::suite::envelope("frozen"))
        .await
        .unwrap_err();
    assert!(matches!(e, QueueError::Unavailable(_)), "{e}");
    let start = tokio::time::Instant::now();
    loop {
        match q.enqueue(crate::suite::envelope("after")).await {
            // An earlier try that timed out may have been stored all the same: the
            // key is then answered as a duplicate of it.
            Ok(_) => break,
            Err(QueueError::Unavailable(e)) => {
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "still unanswered after 15 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(proxy.accepted() > connections, "no new connection was made");
}

/// A server demoted to a replica (a failover the URL does not follow at once) refuses
/// writes with `READONLY`, inside the keyed enqueue's transaction as `EXECABORT`: the
/// enqueue is `Unavailable`, and the connection is made again (where a DNS name would
/// now lead to the new primary). Before, only a bare `READONLY` was seen, and the
/// connection was kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_by_a_demoted_node_makes_the_connection_again() {
    let server = PrivateServer::start(private_redis);
    let port = server.port();
    let direct = format!("redis://127.0.0.1:{port}/");
    answering(&direct, port).await;
    let proxy = crate::proxy::Proxy::start(format!("127.0.0.1:{port}")).await;
    let q = RedisQueue::connect(options().with_url(format!("redis://{}/", proxy.addr())))
        .await
        .unwrap();
    // A replica of a primary that is not there: it answers reads, refuses writes.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let nowhere = held.local_addr().unwrap().port();
    let mut admin = redis::Client::open(direct.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: String = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(nowhere)
        .query_async(&mut admin)
        .await
        .unwrap();
    let connections = proxy.accepted();
    let e = q.enqueue(crate::suite::envelope("k")).await.unwrap_err();
    assert!(matches!(e, QueueError::Unavailable(_)), "{e}");
    let start = tokio::time::Instant::now();
    while proxy.accepted() == connections {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the connection to the demoted node was kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two dead letters with one id are both redriven once, and discarded as listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dead_letters_with_one_id_are_both_redriven_once() {
    let (q, _purge) = make(options());
    crate::broker::two_dead_letters_with_one_id_are_both_redriven_once(q).await;
}
