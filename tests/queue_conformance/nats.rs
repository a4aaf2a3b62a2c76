//! The conformance suite against the NATS JetStream server on loopback
//! (`POSTBOX_NATS_URL`, default `nats://127.0.0.1:4222`), plus connection-loss tests. Each
//! test uses its own streams and deletes them afterwards. An unreachable server fails
//! the test.

use crate::broker::{PrivateServer, Redelivery::ExactlyOnce};
use crate::proxy::{Proxy, host_port};
use postbox::queue::{Enqueued, NatsOptions, NatsQueue, Queue, QueueError};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// Deletes the queue's streams when the test ends.
pub struct Purge(NatsQueue);

impl Drop for Purge {
    fn drop(&mut self) {
        let q = self.0.clone();
        let _ = crate::broker::block_on(q.purge());
    }
}

fn options() -> NatsOptions {
    NatsOptions::new(format!("test_{:016x}", fastrand::u64(..)))
}

async fn connect(options: NatsOptions) -> NatsQueue {
    let url = options.url();
    crate::broker::connect_patiently(
        "NATS JetStream",
        &url,
        "Start it (see shared/services.md: \
             nats-server -js on 127.0.0.1:4222) or point POSTBOX_NATS_URL at one.",
        || NatsQueue::connect(options.clone()),
    )
    .await
}

fn make(options: NatsOptions) -> (NatsQueue, Purge) {
    let q = crate::broker::block_on(connect(options));
    (q.clone(), Purge(q))
}

/// A fresh queue whose connection goes through a proxy the test can cut or hold, with
/// `request_timeout`.
async fn through_a_proxy(request_timeout: Duration) -> (Proxy, NatsQueue, Purge) {
    let proxy = Proxy::start(host_port(&options().url())).await;
    let (q, purge) = make(
        options()
            .with_url(format!("nats://{}", proxy.addr()))
            .with_request_timeout(request_timeout),
    );
    (proxy, q, purge)
}

crate::conformance!(|| make(options()), |capacity| make(
    options().with_capacity(capacity)
));

/// 8 producers enqueue through a proxy whose connections are cut again and again; every
/// enqueue that returned `Ok` is stored, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_connection_drops() {
    let (proxy, q, _purge) = through_a_proxy(Duration::from_secs(2)).await;
    let q = Arc::new(q);
    let proxy = Arc::new(proxy);
    let acked = crate::broker::enqueue_while_the_proxy_cuts(q.clone(), &proxy).await;
    // Leased until all came (a loaded machine may end a fetch early).
    let leased =
        crate::broker::lease_back(&*q, 400, Duration::from_secs(30), crate::suite::at(0)).await;
    let stored: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
    let unique: HashSet<_> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "a message stored twice");
    for id in &acked {
        assert!(unique.contains(id), "acknowledged message {id} lost");
    }
    assert_eq!(stored.len(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_is_unavailable_then_reconnects() {
    let (proxy, q, _purge) = through_a_proxy(Duration::from_secs(2)).await;
    q.enqueue(crate::suite::envelope("before")).await.unwrap();
    proxy.cut();
    retry!(q.enqueue(crate::suite::envelope("after")).await);
    let d = retry!(q.depth().await);
    assert_eq!(d.pending, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_reads_the_message_and_its_headers() {
    let (q, _purge) = make(options());
    let e = crate::suite::envelope("plain");
    assert!(matches!(
        q.enqueue(e.clone()).await.unwrap(),
        Enqueued::Stored(_)
    ));
    let stream = q.jetstream().get_stream(q.streams().0).await.unwrap();
    let m = stream.get_raw_message(1).await.unwrap();
    let h = |k: &str| match m.headers.get(k) {
        Some(v) => v.as_str().to_owned(),
        None => panic!("no header {k} in {:?}", m.headers),
    };
    assert_eq!(h("Postbox-Id"), e.id.to_string());
    // The subject's expected sequence de-duplicates; no window of message ids is kept.
    assert!(m.headers.get(async_nats::header::NATS_MESSAGE_ID).is_none());
    assert_eq!(h("Postbox-Idempotency-Key"), "plain");
    assert_eq!(h("Postbox-Destination"), "api:443");
    assert_eq!(
        m.subject.as_str(),
        format!("postbox.{}.k.x{}", &q.streams().0[8..], "706c61696e")
    );
    assert_eq!(postbox::queue::Envelope::decode(&m.payload).unwrap(), e);
}

/// A publish retried after a lost reply: the message with no key is on a subject of its
/// own, so the second copy is refused while the first is in the stream, and by its
/// `Nats-Msg-Id` for the `duplicate_window` after it was acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_a_key_enqueued_again_is_stored_once_even_after_its_ack() {
    let (q, _purge) = make(options());
    let mut e = crate::suite::envelope("unused");
    e.idempotency_key.clear();
    assert_eq!(q.enqueue(e.clone()).await.unwrap(), Enqueued::Stored(e.id));
    assert_eq!(
        q.enqueue(e.clone()).await.unwrap(),
        Enqueued::Duplicate(e.id)
    );
    let mut other = crate::suite::envelope("unused");
    other.idempotency_key.clear();
    assert_eq!(
        q.enqueue(other.clone()).await.unwrap(),
        Enqueued::Stored(other.id)
    );
    assert_eq!(q.depth().await.unwrap().pending, 2);
    let leased = q
        .lease(10, Duration::from_secs(30), crate::suite::at(0))
        .await
        .unwrap();
    let tokens: Vec<_> = leased.iter().map(|l| l.token).collect();
    q.ack(&tokens).await.unwrap();
    assert_eq!(
        q.enqueue(e.clone()).await.unwrap(),
        Enqueued::Duplicate(e.id)
    );
    assert_eq!(q.depth().await.unwrap().pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_lease_does_not_expire() {
    let (q, _purge) = make(options());
    crate::suite::endless_lease_does_not_expire(q).await;
}

/// Leases a message on a queue connected with `mine`, connects another process with
/// `theirs`, waits `wait` (real time: `ack_wait` runs on the server's clock) and checks
/// that the other process gets nothing: the lease is kept alive.
async fn the_lease_is_kept_from_another_process(
    mine: NatsOptions,
    theirs: NatsOptions,
    wait: Duration,
) {
    let (q, _purge) = make(mine);
    q.enqueue(crate::suite::envelope("held")).await.unwrap();
    let now = crate::suite::t0();
    let leased = q.lease(1, Duration::from_secs(60), now).await.unwrap();
    assert_eq!(leased.len(), 1);
    let other = connect(theirs).await;
    tokio::time::sleep(wait).await;
    let stolen = other.lease(10, Duration::from_secs(60), now).await.unwrap();
    assert!(stolen.is_empty(), "redelivered to another process");
    q.ack(&[leased[0].token]).await.unwrap();
    assert_eq!(q.depth().await.unwrap().pending, 0);
}

/// Another process on the same queue gets nothing while this one holds its lease, even
/// when this one does not call `lease` for several `ack_wait`s (a paused replayer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_delivery_is_not_redelivered_while_its_process_lives() {
    // 3 s (refreshed every 0.75 s): room for a stall on a loaded machine.
    let opts = options().with_ack_wait(Duration::from_secs(3));
    the_lease_is_kept_from_another_process(opts.clone(), opts, Duration::from_secs(8)).await;
}

/// The keep-alive follows the consumer's `ack_wait` on the server: a process that
/// connected with 30 s, after another declared the consumer with 4 s, still keeps its
/// lease (it used to refresh on its own 30 s schedule, and lost it to the other). It
/// reads the server's value every second, so a change is noticed within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keep_alive_follows_the_servers_ack_wait() {
    let slow = options().with_ack_wait(Duration::from_secs(30));
    // 6 s: the first refresh comes within about 2.5 s of the change (a second's sleep,
    // a read of the consumer, a quarter of the new ack_wait), with room on a loaded box.
    let fast = slow.clone().with_ack_wait(Duration::from_secs(6));
    the_lease_is_kept_from_another_process(slow, fast, Duration::from_secs(13)).await;
}

/// Connecting changes only what postbox relies on: an operator's settings on the
/// streams (limits, a description; replicas on a cluster) stay. The streams used to be
/// declared from defaults on every connect, which scaled an R3 stream back to R1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_keeps_what_an_operator_set_on_the_streams() {
    let opts = options();
    let (q, _purge) = make(opts.clone());
    let js = q.jetstream().clone();
    let (work, dead) = q.streams();
    let day = Duration::from_secs(24 * 3600);
    for name in [work, dead] {
        let mut config = js
            .get_stream(name)
            .await
            .unwrap()
            .cached_info()
            .config
            .clone();
        config.description = Some("set by ops".into());
        config.max_age = day;
        js.update_stream(&config).await.unwrap();
    }
    let again = connect(opts).await;
    again.enqueue(crate::suite::envelope("a")).await.unwrap();
    for name in [work, dead] {
        let config = js
            .get_stream(name)
            .await
            .unwrap()
            .cached_info()
            .config
            .clone();
        assert_eq!(config.description.as_deref(), Some("set by ops"), "{name}");
        assert_eq!(config.max_age, day, "{name}");
    }
}

/// A private `nats-server` with JetStream (see [`PrivateServer`]).
fn private_nats(port: u16, dir: &Path) -> Command {
    let mut c = Command::new("nats-server");
    c.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir);
    c
}

/// 8 producers enqueue into a private server while it is killed (SIGKILL) and restarted
/// twice; every enqueue that returned `Ok` is there after the restarts, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_server_is_killed_and_restarted() {
    let mut server = PrivateServer::start(private_nats);
    let port = server.port();
    crate::broker::accepting("nats-server", port, Duration::from_secs(5)).await;
    let url = format!("nats://127.0.0.1:{port}");
    let q = Arc::new(connect(options().with_url(url)).await);
    crate::broker::nothing_acknowledged_is_lost_across_restarts(q, ExactlyOnce, async || {
        server.kill();
        server.spawn();
        crate::broker::accepting("nats-server", port, Duration::from_secs(5)).await;
    })
    .await;
}

/// A server restart keeps the consumer, its deliveries and their pending acks: a
/// lease held across it is still this process', and its ack goes through. (nats-server
/// 2.9 restores the consumer with a creation time some microseconds off; read as a
/// consumer created anew, every held delivery was forgotten: the ack was `LeaseLost`,
/// and the message delivered again after `ack_wait`, to another process too, while
/// its lease still ran.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_held_across_a_server_restart_is_still_this_processes() {
    let mut server = PrivateServer::start(private_nats);
    let port = server.port();
    crate::broker::accepting("nats-server", port, Duration::from_secs(5)).await;
    let q = connect(options().with_url(format!("nats://127.0.0.1:{port}"))).await;
    let lease_for = Duration::from_secs(60);
    let leased_id = q.enqueue(crate::suite::envelope("a")).await.unwrap().id();
    let waiting = q.enqueue(crate::suite::envelope("b")).await.unwrap().id();
    let leased = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    assert_eq!(leased[0].envelope.id, leased_id);
    // The server writes the consumer's state a moment after the delivery: killed
    // before that, it rightly forgets the delivery.
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.kill();
    server.spawn();
    crate::broker::accepting("nats-server", port, Duration::from_secs(5)).await;
    let mut back = false;
    for _ in 0..100 {
        if q.depth().await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the client reconnected");
    // Long enough for the keep-alive task to read the consumer again (every second).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    q.ack(&[leased[0].token]).await.unwrap();
    let next = q.lease(10, lease_for, crate::suite::at(0)).await.unwrap();
    let ids: Vec<_> = next.iter().map(|l| l.envelope.id).collect();
    assert_eq!(
        ids,
        [waiting],
        "the acked message is gone, the other one left"
    );
}

/// Two queues on one name with a 1 s `ack_wait`, and one message (key `key`) that `q`
/// enqueued and leased (`leased`). `q` lives on a runtime that runs only while the test
/// drives it, so its keep-alive task can be stalled; `other`, for checking, on its own.
/// The streams are deleted when it is dropped.
struct Stalled {
    stalled: tokio::runtime::Runtime,
    free: tokio::runtime::Runtime,
    q: NatsQueue,
    other: NatsQueue,
    leased: postbox::queue::Leased,
}

impl Drop for Stalled {
    fn drop(&mut self) {
        let _ = self.free.block_on(self.other.purge());
    }
}

fn stalled_lease(key: &str) -> Stalled {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let (stalled, free) = (runtime(), runtime());
    let opts = options().with_ack_wait(Duration::from_secs(1));
    let q = stalled.block_on(connect(opts.clone()));
    let other = free.block_on(connect(opts));
    let mut leased = stalled.block_on(async {
        q.enqueue(crate::suite::envelope(key)).await.unwrap();
        q.lease(1, Duration::from_secs(60), crate::suite::t0())
            .await
            .unwrap()
    });
    assert_eq!(leased.len(), 1);
    Stalled {
        stalled,
        free,
        q,
        other,
        leased: leased.remove(0),
    }
}

/// When the server delivers again a message this process still holds (its keep-alive
/// was stalled past `ack_wait`), the process keeps its lease: the message is not leased
/// a second time, and the first lease's token acks it.
#[test]
fn a_delivery_redelivered_while_held_keeps_its_lease() {
    let Stalled {
        stalled,
        free,
        q,
        other,
        leased,
    } = &stalled_lease("held");
    let now = crate::suite::t0();
    // Real time, with `q`'s runtime not running: `ack_wait` passes on the server's clock
    // with no keep-alive, so the server makes the delivery available again.
    free.block_on(async { tokio::time::sleep(Duration::from_millis(2500)).await });
    stalled.block_on(async {
        let again = q.lease(10, Duration::from_secs(60), now).await.unwrap();
        assert!(again.is_empty(), "leased twice: {again:?}");
        // The server did deliver it again (else the check above tested nothing).
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = q
            .jetstream()
            .get_consumer_from_stream("postbox", q.streams().0)
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        assert!(info.num_redelivered >= 1, "not delivered again: {info:?}");
        q.ack(&[leased.token]).await.unwrap();
        assert_eq!(q.depth().await.unwrap().pending, 0);
    });
    free.block_on(async {
        let d = other.depth().await.unwrap();
        assert_eq!(d.pending, 0, "the redelivered copy was not acked");
    });
}

/// Publishes `payload` straight to the work stream's subject `postbox.NAME.k.SUFFIX`.
async fn publish_raw(q: &NatsQueue, suffix: &str, payload: Vec<u8>) {
    let subject = format!("postbox.{}.k.{suffix}", &q.streams().0[8..]);
    q.jetstream()
        .publish(subject, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn stream_len(q: &NatsQueue, name: &str) -> u64 {
    let mut s = q.jetstream().get_stream(name).await.unwrap();
    s.info().await.unwrap().state.messages
}

/// A message whose payload is not an envelope goes to the dead-letter stream as it is,
/// with a reason; the rest of the batch is leased as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_is_dead_lettered_and_the_batch_goes_on() {
    let (q, _purge) = make(options());
    publish_raw(&q, "xbad", b"PBOX\x63garbage".to_vec()).await;
    crate::suite::only_the_good_message_is_leased(&q).await;
    let (work, dead) = q.streams();
    assert_eq!(
        stream_len(&q, work).await,
        1,
        "the bad one left the work stream"
    );
    assert_eq!(
        stream_len(&q, dead).await,
        1,
        "the bad one was dead-lettered"
    );
    let stream = q.jetstream().get_stream(dead).await.unwrap();
    let m = stream.get_raw_message(1).await.unwrap();
    assert_eq!(&m.payload[..], b"PBOX\x63garbage");
    let reason = m.headers.get("Postbox-Reason").unwrap().as_str();
    assert!(reason.starts_with("undecodable:"), "{reason}");
    // Listing skips what it cannot decode.
    assert!(q.dead_letters(10).await.unwrap().is_empty());
}

/// An undecodable message as large as the server takes (a plain producer's, without
/// headers) reaches the dead-letter stream: its copy's reason is cut to fit. With the
/// whole reason added, the copy was larger than `max_payload`, the server closed the
/// connection on each try, and the message came back forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_at_the_servers_max_payload_is_dead_lettered() {
    let (q, _purge) = make(options());
    let max = q.jetstream().client().server_info().max_payload;
    assert!(max > 1024, "max_payload {max}");
    // Room beside the payload for the copy's message id and `Postbox-Reason:
    // undecodable`, not for the rest of the reason.
    let id = format!("{}.seq1.dead", q.streams().0);
    let room = "NATS/1.0\r\n\r\n".len()
        + format!("Nats-Msg-Id: {id}\r\n").len()
        + "Postbox-Reason: undecodable\r\n".len();
    let mut payload = b"PBOX\x63".to_vec();
    payload.resize(max - room, b'x');
    publish_raw(&q, "xbig", payload.clone()).await;
    crate::suite::only_the_good_message_is_leased(&q).await;
    let (work, dead) = q.streams();
    assert_eq!(
        stream_len(&q, dead).await,
        1,
        "the large one was dead-lettered"
    );
    assert_eq!(stream_len(&q, work).await, 1, "only the good one is left");
    let stream = q.jetstream().get_stream(dead).await.unwrap();
    let m = stream.get_raw_message(1).await.unwrap();
    assert_eq!(m.payload.len(), payload.len());
    let reason = m.headers.get("Postbox-Reason").unwrap().as_str();
    assert_eq!(reason, "undecodable");
}

/// Undecodable messages published with JetStream's own headers (`Nats-Expected-Last-
/// Subject-Sequence: 0`, as postbox's enqueue sets, and a `Nats-Msg-Id`) all reach the
/// dead-letter stream: the server keeps such headers with a message, and copied to the
/// dead stream the expected sequence was only met while it was empty, so the second
/// one came back forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_with_jetstream_headers_all_reach_the_dead_stream() {
    let (q, _purge) = make(options());
    for (n, suffix) in ["xb1", "xb2"].iter().enumerate() {
        let subject = format!("postbox.{}.k.{suffix}", &q.streams().0[8..]);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        headers.insert("Nats-Msg-Id", format!("bad-{n}").as_str());
        q.jetstream()
            .publish_with_headers(subject, headers, b"PBOX\x63garbage".to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    crate::suite::only_the_good_message_is_leased(&q).await;
    let (work, dead) = q.streams();
    assert_eq!(stream_len(&q, dead).await, 2, "both were dead-lettered");
    assert_eq!(stream_len(&q, work).await, 1, "only the good one is left");
}

/// Two copies of one message in the stream (a `retry_later` whose republish was stored
/// but whose ack of the old copy was lost leaves them) are leased once, and acking it
/// takes both out of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_one_message_are_leased_once_and_both_leave() {
    let (q, _purge) = make(options());
    let e = crate::suite::envelope("copied");
    q.enqueue(e.clone()).await.unwrap();
    publish_raw(&q, "copy", e.encode()).await;
    let leased = q
        .lease(10, Duration::from_secs(30), crate::suite::t0())
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].envelope.id, e.id);
    q.ack(&[leased[0].token]).await.unwrap();
    assert_eq!(stream_len(&q, q.streams().0).await, 0);
}

/// A retry of a delivery whose subject's last message is a newer copy of the same
/// message (stored by an earlier move or retry whose ack of the delivery was lost) is
/// still the lease's: its copy goes after that one, which is deleted. One copy is left,
/// with the retry's not-before and attempts. (It was `LeaseLost`: the delivery came
/// back after `ack_wait` beside the newer copy, the retry's delay forgotten.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_later_over_a_newer_copy_of_its_own_message_replaces_it() {
    let (q, _purge) = make(options());
    let e = crate::suite::envelope("own-copy");
    q.enqueue(e.clone()).await.unwrap();
    let leased = q
        .lease(1, Duration::from_secs(30), crate::suite::t0())
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    let subject: String = b"own-copy".iter().map(|b| format!("{b:02x}")).collect();
    publish_raw(&q, &format!("x{subject}"), e.encode()).await;
    assert_eq!(stream_len(&q, q.streams().0).await, 2);
    q.retry_later(leased[0].token, crate::suite::at(60))
        .await
        .unwrap();
    assert_eq!(stream_len(&q, q.streams().0).await, 1, "one copy is left");
    let early = q
        .lease(10, Duration::from_secs(30), crate::suite::at(59))
        .await
        .unwrap();
    assert!(early.is_empty(), "leased before its not-before: {early:?}");
    let again = q
        .lease(10, Duration::from_secs(30), crate::suite::at(60))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].envelope.id, e.id);
    assert_eq!(again[0].envelope.attempts, leased[0].envelope.attempts + 1);
    q.ack(&[again[0].token]).await.unwrap();
    assert_eq!(stream_len(&q, q.streams().0).await, 0);
}

/// A newer copy of a message held leased (a `retry_later` whose republish was stored
/// but whose ack of the delivery failed) carries the retry's not-before: once the lease
/// in progress ends, the message waits for it instead of being leased again at once.
/// Its attempts never go back (a copy made before the held one's latest lease counts
/// fewer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_copy_taken_over_keeps_its_not_before_after_the_lease_ends() {
    let (q, _purge) = make(options());
    let e = crate::suite::envelope("copied");
    q.enqueue(e.clone()).await.unwrap();
    let lease_for = Duration::from_secs(30);
    let leased = q.lease(1, lease_for, crate::suite::t0()).await.unwrap();
    assert_eq!(leased.len(), 1);
    // The retry's copy, stored behind the leased delivery.
    let mut retry = e.clone();
    retry.not_before = crate::suite::at(120);
    retry.attempts = 0;
    let subject: String = b"copied".iter().map(|b| format!("{b:02x}")).collect();
    publish_raw(&q, &format!("x{subject}"), retry.encode()).await;
    // A lease fetches the copy and keeps holding the message, still leased.
    assert!(
        q.lease(10, lease_for, crate::suite::at(1))
            .await
            .unwrap()
            .is_empty()
    );
    // The lease ends at 30 s: the message waits for the copy's 120 s.
    let early = q.lease(10, lease_for, crate::suite::at(60)).await.unwrap();
    assert!(
        early.is_empty(),
        "leased before the copy's not-before: {early:?}"
    );
    let again = q.lease(10, lease_for, crate::suite::at(120)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].envelope.id, e.id);
    assert_eq!(again[0].envelope.attempts, leased[0].envelope.attempts + 1);
    q.ack(&[again[0].token]).await.unwrap();
    assert_eq!(stream_len(&q, q.streams().0).await, 0);
}

/// Connecting again with a capacity below the number of messages the queue holds is
/// refused with a clear error; the server is not asked to apply it, which would delete
/// the oldest stored messages to fit. A capacity they fit in is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_below_the_stored_messages_is_refused_not_applied() {
    let base = options();
    let (q, _purge) = make(base.clone().with_capacity(10));
    for i in 0..5 {
        let e = crate::suite::envelope(&format!("m{i}"));
        assert_eq!(q.enqueue(e.clone()).await.unwrap(), Enqueued::Stored(e.id));
    }
    let lower = NatsQueue::connect(base.clone().with_capacity(2)).await;
    match lower {
        Err(QueueError::Backend(e)) => assert!(e.to_string().contains("capacity"), "{e}"),
        other => panic!("expected a Backend error, got {:?}", other.map(|_| ())),
    }
    assert_eq!(q.depth().await.unwrap().pending, 5);
    let fits = NatsQueue::connect(base.with_capacity(5)).await.unwrap();
    let full = fits.enqueue(crate::suite::envelope("m5")).await;
    assert!(matches!(full, Err(QueueError::Full { .. })), "{full:?}");
    assert_eq!(q.depth().await.unwrap().pending, 5);
}

/// A full queue still takes a `retry_later`: the republished copy cannot be stored
/// beside the original, so the delivery is kept, scheduled for the new not-before, with
/// the attempt counted, instead of failing (which let the lease expire and replayed the
/// message at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_later_on_a_full_queue_keeps_the_delivery_scheduled() {
    let (q, _purge) = make(options().with_capacity(1));
    let e = crate::suite::envelope("only");
    q.enqueue(e.clone()).await.unwrap();
    let lease_for = Duration::from_secs(30);
    let leased = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    q.retry_later(leased[0].token, crate::suite::at(60))
        .await
        .unwrap();
    assert!(
        q.lease(1, lease_for, crate::suite::at(59))
            .await
            .unwrap()
            .is_empty()
    );
    let again = q.lease(1, lease_for, crate::suite::at(60)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].envelope.id, e.id);
    assert_eq!(again[0].envelope.attempts, 2);
    assert_eq!(again[0].envelope.not_before, crate::suite::at(60));
    q.ack(&[again[0].token]).await.unwrap();
    assert_eq!(q.depth().await.unwrap().pending, 0);
}

/// A message larger than the server's `max_payload` is refused with a clear error
/// before it is sent (the server would close the connection, failing every call on it,
/// and the caller would see a timeout): the connection stays up for the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_the_server_takes_is_refused_before_sending() {
    let (q, _purge) = make(options());
    let max = q.jetstream().client().server_info().max_payload;
    let mut e = crate::suite::envelope("big");
    e.body = bytes::Bytes::from(vec![b'x'; max]);
    let refused = q.enqueue(e).await;
    match refused {
        Err(QueueError::Backend(e)) => assert!(e.to_string().contains("max_payload"), "{e}"),
        other => panic!("expected a Backend error, got {other:?}"),
    }
    let small = q.enqueue(crate::suite::envelope("small")).await.unwrap();
    assert!(matches!(small, Enqueued::Stored(_)));
    assert_eq!(
        q.jetstream()
            .client()
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// An ack the server did not confirm (the connection stalled) fails as `Unavailable`
/// and keeps the lease: the same token acks once the server is reachable again, instead
/// of finding its lease lost (and the message replayed when `ack_wait` passes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_ack_keeps_the_lease_for_a_second_try() {
    let (proxy, q, _purge) = through_a_proxy(Duration::from_secs(2)).await;
    let e = crate::suite::envelope("acked");
    q.enqueue(e.clone()).await.unwrap();
    let lease_for = Duration::from_secs(30);
    let leased = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    proxy.hold();
    let failed = q.ack(&[leased[0].token]).await;
    assert!(
        matches!(failed, Err(QueueError::Unavailable(_))),
        "{failed:?}"
    );
    proxy.cut();
    proxy.release();
    retry!(q.ack(&[leased[0].token]).await);
    assert_eq!(retry!(q.depth().await).pending, 0);
    assert!(retry!(q.lease(1, lease_for, crate::suite::at(3600)).await).is_empty());
}

/// A settle waiting on the server (the republish of a `retry_later` that gets no
/// answer) does not hold up the process's other leases: a delivery it holds, due, is
/// leased at once (the republish held the lock on the held deliveries, so every lease
/// and settle of the process waited for its timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republish_waiting_on_the_server_does_not_block_other_leases() {
    let (proxy, q, _purge) = through_a_proxy(Duration::from_secs(3)).await;
    for k in ["slow", "held"] {
        q.enqueue(crate::suite::envelope(k)).await.unwrap();
    }
    let lease_for = Duration::from_secs(30);
    let leased = q.lease(2, lease_for, crate::suite::at(0)).await.unwrap();
    assert_eq!(leased.len(), 2);
    q.release(leased[1].token, crate::suite::at(0))
        .await
        .unwrap();
    proxy.hold();
    let mut retry = tokio_test::task::spawn(q.retry_later(leased[0].token, crate::suite::at(60)));
    tokio_test::assert_pending!(retry.poll()); // waiting for the server's answer
    let again = tokio::time::timeout(
        Duration::from_secs(1),
        q.lease(1, lease_for, crate::suite::at(0)),
    )
    .await
    .expect("the lease waited for the republish")
    .unwrap();
    assert_eq!(again[0].envelope.id, leased[1].envelope.id);
    proxy.release();
    // Answered once the server is reached again (or given up as unavailable, the
    // connection cut meanwhile): never another error.
    let r = retry.await;
    assert!(
        matches!(r, Ok(()) | Err(QueueError::Unavailable(_))),
        "{r:?}"
    );
}

/// A queue named like another queue's dead-letter stream (`orders_DEAD` for the
/// queue `orders`) is refused: the two would share a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_is_another_queues_dead_letter_stream_is_refused() {
    let e = NatsQueue::connect(NatsOptions::new("orders_DEAD"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("`_DEAD`"), "{e}");
}

/// A lease while the client is cut off from the server answers `Unavailable` at once,
/// without queueing a pull request that would go out after the reconnect to an inbox
/// given up by then; once the server is back, the message is leased, counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_while_disconnected_is_unavailable_at_once() {
    let (proxy, q, _purge) = through_a_proxy(Duration::from_secs(5)).await;
    let id = q.enqueue(crate::suite::envelope("m")).await.unwrap().id();
    proxy.hold();
    proxy.cut();
    let connected =
        || q.jetstream().client().connection_state() == async_nats::connection::State::Connected;
    for _ in 0..100 {
        if !connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!connected(), "the client did not see the cut");
    let lease_for = Duration::from_secs(30);
    let started = tokio::time::Instant::now();
    let refused = q.lease(1, lease_for, crate::suite::at(0)).await;
    assert!(
        matches!(refused, Err(QueueError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited {:?}",
        started.elapsed()
    );
    proxy.release();
    let got = retry!(q.lease(1, lease_for, crate::suite::at(0)).await);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].envelope.id, got[0].envelope.attempts), (id, 1));
    q.ack(&[got[0].token]).await.unwrap();
}

/// A `retry_later` whose caller stops waiting while the server has not answered still
/// settles the delivery it took: the copy is stored and the delivery acked, not left
/// unsettled until `ack_wait` brings it back as a second copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_later_its_caller_stops_waiting_for_still_settles_the_delivery() {
    let (proxy, q, _purge) = through_a_proxy(Duration::from_secs(10)).await;
    let id = q.enqueue(crate::suite::envelope("m")).await.unwrap().id();
    let lease_for = Duration::from_secs(30);
    let leased = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    proxy.hold();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        q.retry_later(leased[0].token, crate::suite::at(10)),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "answered while the proxy held: {gave_up:?}"
    );
    proxy.release();
    // The call goes on: the copy is stored and the delivery acked (polled, for a
    // machine under load).
    let mut again = Vec::new();
    for _ in 0..50 {
        again = q.lease(10, lease_for, crate::suite::at(10)).await.unwrap();
        if !again.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].envelope.id, again[0].envelope.attempts), (id, 2));
    q.ack(&[again[0].token]).await.unwrap();
    let mut depth = q.depth().await.unwrap();
    for _ in 0..50 {
        if (depth.pending, depth.in_flight) == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        depth = q.depth().await.unwrap();
    }
    assert_eq!(
        (depth.pending, depth.in_flight),
        (0, 0),
        "the delivery was left unsettled: {depth:?}"
    );
}

/// A capacity of 0 is refused at connect: JetStream would take a `max_msgs` of 0 for no
/// limit, where the other queues hold no message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_of_zero_is_refused() {
    let e = NatsQueue::connect(options().with_capacity(0))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("a capacity of 0"), "{e}");
}

/// A process holding as many deliveries as it may, all scheduled for later (retries of
/// a dependency that is down), still gets to a due message behind them: the lease moves
/// the one due last to the stream's tail, with its not-before and attempts, and
/// fetches what was behind it. Nothing is lost or counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_message_behind_a_full_hold_of_later_ones_is_leased() {
    let (q, _purge) = make(options().with_max_held(2));
    let lease_for = Duration::from_secs(30);
    let mut later_ids = Vec::new();
    for (key, secs) in [("soon", 600), ("late", 3600)] {
        let mut e = crate::suite::envelope(key);
        e.not_before = crate::suite::at(secs);
        e.attempts = 3;
        later_ids.push(q.enqueue(e).await.unwrap().id());
    }
    let now_id = q.enqueue(crate::suite::envelope("now")).await.unwrap().id();
    // The first lease fetches the two later ones: nothing due.
    assert!(
        q.lease(10, lease_for, crate::suite::at(0))
            .await
            .unwrap()
            .is_empty()
    );
    let got = q.lease(10, lease_for, crate::suite::at(0)).await.unwrap();
    let ids: Vec<_> = got.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![now_id], "the due message is still stuck behind");
    q.ack(&[got[0].token]).await.unwrap();
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.pending, depth.in_flight), (2, 0), "{depth:?}");
    // Both come back when due, with the attempts they had (+1 for this lease).
    let soon = q.lease(10, lease_for, crate::suite::at(600)).await.unwrap();
    assert_eq!(soon.len(), 1);
    assert_eq!(
        (soon[0].envelope.id, soon[0].envelope.attempts),
        (later_ids[0], 4)
    );
    q.ack(&[soon[0].token]).await.unwrap();
    let late = q
        .lease(10, lease_for, crate::suite::at(3600))
        .await
        .unwrap();
    assert_eq!(late.len(), 1);
    assert_eq!(
        (late[0].envelope.id, late[0].envelope.attempts),
        (later_ids[1], 4)
    );
    assert_eq!(late[0].envelope.not_before, crate::suite::at(3600));
}

/// A lease for one message fetches past deliveries not due yet (retries a process
/// that stopped left for later) to the due one behind them, in that one lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lease_fetches_past_later_deliveries_to_a_due_one() {
    let (q, _purge) = make(options());
    let lease_for = Duration::from_secs(30);
    for (key, secs) in [("a", 600), ("b", 700), ("c", 800)] {
        let mut e = crate::suite::envelope(key);
        e.not_before = crate::suite::at(secs);
        q.enqueue(e).await.unwrap();
    }
    let now_id = q.enqueue(crate::suite::envelope("now")).await.unwrap().id();
    let got = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    let ids: Vec<_> = got.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![now_id], "the due message waits behind later ones");
    q.ack(&[got[0].token]).await.unwrap();
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.pending, depth.in_flight), (3, 0), "{depth:?}");
    let later = q.lease(10, lease_for, crate::suite::at(800)).await.unwrap();
    assert_eq!(later.len(), 3);
}

/// A held delivery moved to the tail to make room while a newer copy of it is its
/// subject's last message (a move or retry whose copy was stored but whose ack was
/// lost) is acked, the newer copy kept. (It was dropped from the hold unacked: no
/// longer kept alive, the server delivered it again after `ack_wait`, beside the
/// newer copy.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_delivery_moved_behind_a_newer_copy_of_itself_is_acked() {
    let (q, _purge) = make(options().with_max_held(2));
    let lease_for = Duration::from_secs(30);
    let mut soon = crate::suite::envelope("soon");
    soon.not_before = crate::suite::at(600);
    let mut late = crate::suite::envelope("late");
    late.not_before = crate::suite::at(3600);
    q.enqueue(soon).await.unwrap();
    q.enqueue(late.clone()).await.unwrap();
    let now_id = q.enqueue(crate::suite::envelope("now")).await.unwrap().id();
    // The first lease fetches the two later ones: nothing due.
    assert!(
        q.lease(10, lease_for, crate::suite::at(0))
            .await
            .unwrap()
            .is_empty()
    );
    let subject: String = b"late".iter().map(|b| format!("{b:02x}")).collect();
    publish_raw(&q, &format!("x{subject}"), late.encode()).await;
    assert_eq!(stream_len(&q, q.streams().0).await, 4);
    let got = q.lease(10, lease_for, crate::suite::at(0)).await.unwrap();
    let ids: Vec<_> = got.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![now_id]);
    assert_eq!(
        stream_len(&q, q.streams().0).await,
        3,
        "the moved delivery was acked, its newer copy kept"
    );
}

/// A lease whose caller stops waiting while the server's answer is on its way (a
/// timeout around `lease`) still ends: the message it got is leased to no one and
/// comes back when that lease ends, not after the consumer's `ack_wait` (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_dropped_while_the_server_answers_comes_back_when_its_lease_ends() {
    let (proxy, q, _purge) = through_a_proxy(Duration::from_secs(5)).await;
    let e = crate::suite::envelope("dropped-lease");
    q.enqueue(e.clone()).await.unwrap();
    proxy.hold();
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        q.lease(1, Duration::from_secs(1), crate::suite::at(0)),
    )
    .await;
    assert!(
        dropped.is_err(),
        "answered through a held proxy: {dropped:?}"
    );
    proxy.release();
    let mut again = Vec::new();
    for _ in 0..50 {
        again = q
            .lease(1, Duration::from_secs(30), crate::suite::at(2))
            .await
            .unwrap();
        if !again.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(again.len(), 1, "the message is stranded until ack_wait");
    assert_eq!(again[0].envelope.id, e.id);
}

/// A lease making room on a slow server stops moving held deliveries after a quarter
/// of `ack_wait`: the held deliveries are locked meanwhile, and the keep-alive that
/// refreshes them needs the lock (unrefreshed past `ack_wait`, the server hands them
/// to another process). The next lease goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn making_room_on_a_slow_server_stops_within_a_quarter_of_ack_wait() {
    let proxy = Proxy::start(host_port(&options().url())).await;
    let (q, _purge) = make(
        options()
            .with_url(format!("nats://{}", proxy.addr()))
            .with_request_timeout(Duration::from_secs(5))
            .with_max_held(2)
            .with_ack_wait(Duration::from_secs(2)),
    );
    let q = Arc::new(q);
    let lease_for = Duration::from_secs(30);
    for (key, secs) in [("soon", 600), ("late", 3600)] {
        let mut e = crate::suite::envelope(key);
        e.not_before = crate::suite::at(secs);
        q.enqueue(e).await.unwrap();
    }
    for key in ["now-1", "now-2"] {
        q.enqueue(crate::suite::envelope(key)).await.unwrap();
    }
    // The first lease fetches the two later ones: nothing due, and the hold is full.
    assert!(
        q.lease(10, lease_for, crate::suite::at(0))
            .await
            .unwrap()
            .is_empty()
    );
    // The server answers nothing: the lease gives up making room after its budget
    // (0.5 s), not after the 5 s request timeout, and holds the lock no longer: well
    // within `ack_wait` (past it, the held deliveries would be handed out again).
    proxy.hold();
    let got = tokio::time::timeout(
        Duration::from_secs(2),
        q.lease(10, lease_for, crate::suite::at(0)),
    )
    .await
    .expect("the lease waited on the server past ack_wait")
    .unwrap();
    assert!(got.is_empty(), "moved without an answer: {got:?}");
    proxy.release();
    // Leased until both came: a loaded machine may take the budget over moving one.
    let got = crate::broker::lease_back(&*q, 2, lease_for, crate::suite::at(0)).await;
    let mut keys: Vec<_> = got
        .iter()
        .map(|l| l.envelope.idempotency_key.as_str())
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["now-1", "now-2"]);
}

/// With nothing behind a full hold but the copies it moved there itself, a lease moves
/// nothing more: the held deliveries are not sent round the stream on every poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_hold_of_later_deliveries_is_not_sent_round_for_ever() {
    let (q, _purge) = make(options().with_max_held(2));
    let lease_for = Duration::from_secs(30);
    for (key, secs) in [("a", 600), ("b", 3600), ("c", 1800)] {
        let mut e = crate::suite::envelope(key);
        e.not_before = crate::suite::at(secs);
        q.enqueue(e).await.unwrap();
    }
    let last_seq = || async {
        let mut s = q.jetstream().get_stream(q.streams().0).await.unwrap();
        s.info().await.unwrap().state.last_sequence
    };
    // The first lease fetches two; the second moves one to make room for the third.
    for _ in 0..2 {
        assert!(
            q.lease(10, lease_for, crate::suite::at(0))
                .await
                .unwrap()
                .is_empty()
        );
    }
    // Past the pause that follows a move bringing nothing due: what stops a move now
    // is that only the moved copy is behind.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let settled = last_seq().await;
    for _ in 0..4 {
        assert!(
            q.lease(10, lease_for, crate::suite::at(0))
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(last_seq().await, settled, "held deliveries moved again");
    // All three are still there, each leased once when due.
    let mut got = Vec::new();
    for secs in [600, 1800, 3600] {
        let l = q
            .lease(10, lease_for, crate::suite::at(secs))
            .await
            .unwrap();
        assert_eq!(l.len(), 1, "at {secs}");
        assert_eq!(l[0].envelope.not_before, crate::suite::at(secs));
        q.ack(&[l[0].token]).await.unwrap();
        got.push(l[0].envelope.idempotency_key.clone());
    }
    assert_eq!(got, ["a", "c", "b"]);
}

/// Two processes share the consumer, whose server-side limit of unacked deliveries (one
/// set on the consumer by hand: postbox's declare sets none) is full: a process still
/// leases what it holds itself (a delivery it released) instead of failing because the
/// server has nothing more to give it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_leases_what_it_holds_while_the_server_limit_is_full() {
    let base = options()
        .with_max_held(2)
        .with_request_timeout(Duration::from_secs(2));
    let (a, _purge) = make(base.clone());
    let b = connect(base).await;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = a
        .jetstream()
        .get_consumer_from_stream("postbox", a.streams().0)
        .await
        .unwrap();
    let mut config = consumer.info().await.unwrap().config.clone();
    config.max_ack_pending = 2;
    a.jetstream()
        .get_stream(a.streams().0)
        .await
        .unwrap()
        .create_consumer(config)
        .await
        .unwrap();
    for i in 0..3 {
        a.enqueue(crate::suite::envelope(&format!("m{i}")))
            .await
            .unwrap();
    }
    let lease_for = Duration::from_secs(30);
    let mine = a.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    assert_eq!(
        b.lease(1, lease_for, crate::suite::at(0))
            .await
            .unwrap()
            .len(),
        1
    );
    a.release(mine[0].token, crate::suite::at(0)).await.unwrap();
    let again = a.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].envelope.id, mine[0].envelope.id);
    // Asked for more than it holds: the fetch for the rest gets nothing in time.
    a.release(again[0].token, crate::suite::at(0))
        .await
        .unwrap();
    let more = a.lease(2, lease_for, crate::suite::at(0)).await.unwrap();
    let ids: Vec<_> = more.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![mine[0].envelope.id]);
}

/// A process that stalled past `ack_wait` while holding a lease finds it lost when it
/// calls `retry_later` after the redelivered copy was acked elsewhere and a new message
/// took the key: its republish is refused, and the key still has one live message.
#[test]
fn retry_later_after_the_message_was_settled_elsewhere_is_lease_lost() {
    let Stalled {
        stalled,
        free,
        q,
        other,
        leased,
    } = &stalled_lease("k");
    let now = crate::suite::t0();
    let newer = free.block_on(async {
        // `ack_wait` passes with `q`'s keep-alive stalled: `other` gets the delivery
        // (real time, on the server's clock: asked again until it comes).
        let mut again = Vec::new();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            again = other.lease(1, Duration::from_secs(60), now).await.unwrap();
            if !again.is_empty() {
                break;
            }
        }
        assert_eq!(again.len(), 1, "the server never delivered it again");
        other.ack(&[again[0].token]).await.unwrap();
        other.enqueue(crate::suite::envelope("k")).await.unwrap()
    });
    assert!(matches!(newer, Enqueued::Stored(_)), "{newer:?}");
    let retried = stalled.block_on(q.retry_later(leased.token, crate::suite::at(60)));
    assert!(
        matches!(retried, Err(QueueError::LeaseLost(_))),
        "{retried:?}"
    );
    free.block_on(async {
        assert_eq!(other.depth().await.unwrap().pending, 1);
    });
}

/// The consumer, the dead-letter stream or the work stream deleted by hand is declared
/// again by the next call that finds it missing (that call may fail as `Unavailable`):
/// leasing, dead-lettering and enqueueing go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_or_stream_deleted_by_hand_is_declared_again() {
    let (q, _purge) = make(options().with_request_timeout(Duration::from_secs(2)));
    let lease_for = Duration::from_secs(30);
    let a = q.enqueue(crate::suite::envelope("a")).await.unwrap().id();
    let js = q.jetstream().clone();
    let (work, dead) = q.streams();
    let (work, dead) = (work.to_owned(), dead.to_owned());
    js.delete_consumer_from_stream("postbox", &work)
        .await
        .unwrap();
    let leased = retry!(q.lease(10, lease_for, crate::suite::at(0)).await);
    let ids: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![a]);
    js.delete_stream(&dead).await.unwrap();
    retry!(q.dead_letter(leased[0].token, "bad").await);
    assert_eq!(q.depth().await.unwrap().dead, 1);
    js.delete_stream(&work).await.unwrap();
    let b = q.enqueue(crate::suite::envelope("b")).await.unwrap();
    assert!(matches!(b, Enqueued::Stored(_)), "{b:?}");
    let leased = retry!(q.lease(10, lease_for, crate::suite::at(0)).await);
    let ids: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![b.id()]);
}

/// An ack or a dead letter the server never applied (nobody listens on the consumer's
/// ack subject: the consumer deleted by hand after the lease) fails instead of being
/// reported done: the message is still in the stream, and comes back. (The "no
/// responders" answer was taken for a confirmation.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_nobody_applied_fails_and_the_message_comes_back() {
    let (q, _purge) = make(options().with_request_timeout(Duration::from_secs(2)));
    let lease_for = Duration::from_secs(30);
    for (k, dead) in [("acked", false), ("dead", true)] {
        let e = crate::suite::envelope(k);
        q.enqueue(e.clone()).await.unwrap();
        let leased = q.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
        assert_eq!(leased.len(), 1, "{k}");
        let (work, _) = q.streams();
        q.jetstream()
            .delete_consumer_from_stream("postbox", work)
            .await
            .unwrap();
        let settled = if dead {
            q.dead_letter(leased[0].token, "bad").await
        } else {
            q.ack(&[leased[0].token]).await
        };
        assert!(
            matches!(settled, Err(QueueError::Unavailable(_))),
            "{k}: {settled:?}"
        );
        // Still in the work stream: leased again (once the consumer is made again).
        let again = retry!(q.lease(1, lease_for, crate::suite::at(0)).await);
        assert_eq!(again.len(), 1, "{k}");
        assert_eq!(again[0].envelope.id, e.id, "{k}");
        q.ack(&[again[0].token]).await.unwrap();
    }
}

/// Counts the "declared again" events seen on this thread.
struct Declarations(Arc<std::sync::atomic::AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Declarations {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" && format!("{v:?}").contains("declared again") {
                    self.0 = true;
                }
            }
        }
        let mut m = Message(false);
        event.record(&mut m);
        if m.0 {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Producers that all meet the work stream deleted by hand wait for one declaration
/// instead of each making its own (three or four requests each, one after another,
/// holding the lock every lease and settle needs): every enqueue is stored, and the
/// streams are declared once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_meeting_a_deleted_stream_declare_it_once() {
    use tracing_subscriber::layer::SubscriberExt;
    let (q, _purge) = make(options());
    q.enqueue(crate::suite::envelope("first")).await.unwrap();
    q.jetstream().delete_stream(q.streams().0).await.unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let subscriber = tracing_subscriber::registry().with(Declarations(count.clone()));
    let _guard = tracing::subscriber::set_default(subscriber);
    // Polled on this thread, so its subscriber sees every event.
    let results = futures_util::future::join_all(
        (0..16).map(|i| q.enqueue(crate::suite::envelope(&format!("k{i}")))),
    )
    .await;
    for r in results {
        assert!(matches!(r, Ok(Enqueued::Stored(_))), "{r:?}");
    }
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(q.depth().await.unwrap().pending, 16);
}

/// Dead letters that all meet the dead-letter stream deleted by hand join one
/// declaration too: each that met it fails `Unavailable` (to be repeated), and the
/// streams are declared once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_meeting_a_deleted_stream_declare_it_once() {
    use tracing_subscriber::layer::SubscriberExt;
    let (q, _purge) = make(options());
    for i in 0..8 {
        q.enqueue(crate::suite::envelope(&format!("k{i}")))
            .await
            .unwrap();
    }
    let leased = q
        .lease(8, Duration::from_secs(30), crate::suite::at(0))
        .await
        .unwrap();
    assert_eq!(leased.len(), 8);
    q.jetstream().delete_stream(q.streams().1).await.unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let subscriber = tracing_subscriber::registry().with(Declarations(count.clone()));
    let _guard = tracing::subscriber::set_default(subscriber);
    // `dead_letter` runs on a task of its own, reporting to this thread's subscriber.
    let results =
        futures_util::future::join_all(leased.iter().map(|l| q.dead_letter(l.token, "bad"))).await;
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(QueueError::Unavailable(_)))),
        "none met the deleted stream: {results:?}"
    );
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    for (l, r) in leased.iter().zip(&results) {
        match r {
            Ok(()) => {}
            Err(QueueError::Unavailable(_)) => {
                retry!(q.dead_letter(l.token, "bad").await);
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(q.depth().await.unwrap().dead, 8);
}

/// A lease from before the stream was deleted by hand and declared again is lost, not
/// acked on the new consumer: the new stream numbers its messages from 1 again, and
/// the old lease's ack (of stream sequence 1) used to remove the new message 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_from_before_the_stream_was_recreated_acks_nothing_new() {
    let (q, _purge) = make(options().with_request_timeout(Duration::from_secs(2)));
    let lease_for = Duration::from_secs(30);
    q.enqueue(crate::suite::envelope("old")).await.unwrap();
    let old = q.lease(10, lease_for, crate::suite::at(0)).await.unwrap();
    assert_eq!(old.len(), 1);
    let (work, _) = q.streams();
    let work = work.to_owned();
    q.jetstream().delete_stream(&work).await.unwrap();
    let new = q.enqueue(crate::suite::envelope("new")).await.unwrap().id();
    let leased = retry!(q.lease(10, lease_for, crate::suite::at(0)).await);
    let ids: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![new]);
    let stale = q.ack(&[old[0].token]).await;
    assert!(matches!(stale, Err(QueueError::LeaseLost(_))), "{stale:?}");
    assert_eq!(stream_len(&q, &work).await, 1, "the new message was acked");
    q.ack(&[leased[0].token]).await.unwrap();
    assert_eq!(stream_len(&q, &work).await, 0);
}

/// The same when another process declared the stream and consumer again: this one,
/// whose fetches go on working against the new consumer, notices it within a second or
/// so, and its old lease is lost instead of acking the other process' new message 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_from_before_another_process_recreated_the_stream_acks_nothing_new() {
    let opts = options();
    let (q, _purge) = make(opts.clone());
    q.enqueue(crate::suite::envelope("old")).await.unwrap();
    let old = q
        .lease(10, Duration::from_secs(30), crate::suite::at(0))
        .await
        .unwrap();
    assert_eq!(old.len(), 1);
    let (work, _) = q.streams();
    let work = work.to_owned();
    q.jetstream().delete_stream(&work).await.unwrap();
    let other = connect(opts).await;
    other.enqueue(crate::suite::envelope("new")).await.unwrap();
    // Real time: the keep-alive task reads the consumer every second, and then holds
    // no lease any more.
    for _ in 0..100 {
        if q.depth().await.unwrap().in_flight == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stale = q.ack(&[old[0].token]).await;
    assert!(matches!(stale, Err(QueueError::LeaseLost(_))), "{stale:?}");
    assert_eq!(stream_len(&q, &work).await, 1, "the new message was acked");
}

/// An operator's `max_age` shorter than postbox's de-duplication window (which the
/// server refuses) does not stop connecting: the window is kept within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_age_shorter_than_the_duplicate_window_still_connects() {
    let opts = options();
    let (q, _purge) = make(opts.clone());
    let js = q.jetstream().clone();
    let work = q.streams().0.to_owned();
    let minute = Duration::from_secs(60);
    let mut config = js
        .get_stream(&work)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    config.max_age = minute;
    config.duplicate_window = minute;
    js.update_stream(&config).await.unwrap();
    let again = connect(opts).await;
    again.enqueue(crate::suite::envelope("a")).await.unwrap();
    let config = js
        .get_stream(&work)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!((config.max_age, config.duplicate_window), (minute, minute));
}

/// A queue whose stream was given a byte limit by hand answers an enqueue over it with
/// a backend error, not `Full` (with or without a capacity of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_set_on_the_stream_by_hand_is_a_backend_error_not_full() {
    for options in [options(), options().with_capacity(100)] {
        let (q, _purge) = make(options);
        let js = q.jetstream().clone();
        let mut stream = js.get_stream(q.streams().0).await.unwrap();
        let mut config = stream.info().await.unwrap().config.clone();
        config.max_bytes = 64;
        js.update_stream(config).await.unwrap();
        let refused = q.enqueue(crate::suite::envelope("big")).await;
        assert!(
            matches!(refused, Err(QueueError::Backend(_))),
            "{refused:?}"
        );
    }
}

/// An invalid URL is a configuration error (`Backend`), found before any connect; a
/// comma-separated list names the servers of a cluster: one that is down is passed
/// over for the next.
#[tokio::test]
async fn an_invalid_url_is_a_backend_error_and_a_list_names_several_servers() {
    let e = NatsQueue::connect(options().with_url("nats://127.0.0.1:notaport"))
        .await
        .unwrap_err();
    assert!(matches!(e, QueueError::Backend(_)), "{e}");
    // Bound, not listening: a connect is refused, and no other test takes the port.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = held.local_addr().unwrap();
    let up = options().url();
    let listed = options().with_url(format!("nats://{dead},{up}"));
    let q = connect(listed).await;
    let stored = q.enqueue(crate::suite::envelope("k")).await.unwrap();
    assert!(matches!(stored, Enqueued::Stored(_)), "{stored:?}");
    q.purge().await.unwrap();
}

/// A private server that wants a user and password (`postbox` / `s3cr,t`).
fn private_nats_with_auth(port: u16, dir: &Path) -> Command {
    let mut c = private_nats(port, dir);
    c.args(["--user", "postbox", "--pass", "s3cr,t"]);
    c
}

/// The credentials in the URL are used (the client reads none from a URL by itself:
/// a server that wants them refused every connect), a comma in the password included
/// (written `%2C`);
/// without them, or with wrong ones, the connect is a configuration error
/// (`Backend`), not an outage to wait out — and the error does not show the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_credentials_in_the_url_are_used() {
    let server = PrivateServer::start(private_nats_with_auth);
    let port = server.port();
    crate::broker::accepting("nats-server", port, Duration::from_secs(5)).await;
    let q =
        NatsQueue::connect(options().with_url(format!("nats://postbox:s3cr%2Ct@127.0.0.1:{port}")))
            .await
            .unwrap();
    let stored = q.enqueue(crate::suite::envelope("k")).await.unwrap();
    assert!(matches!(stored, Enqueued::Stored(_)), "{stored:?}");
    for url in [
        format!("nats://127.0.0.1:{port}"),
        format!("nats://postbox:wrong-pw-9@127.0.0.1:{port}"),
        // A list: each server's password is left out of the error.
        format!(
            "nats://postbox:wrong-pw-9@127.0.0.1:{port},nats://postbox:wrong-pw-9@127.0.0.1:{port}"
        ),
    ] {
        let e = NatsQueue::connect(options().with_url(url))
            .await
            .unwrap_err();
        assert!(matches!(e, QueueError::Backend(_)), "{e}");
        assert!(!e.to_string().contains("wrong-pw-9"), "{e}");
    }
}

/// Leases `key`'s message once, then stores by hand the copy its `retry_later` would
/// have (`Nats-Msg-Id` `<id>.r<seq>`, after the delivery's own sequence), as if that
/// retry's reply was lost and given up on; then leases the message again. Returns the
/// queue, its purge, the message, and the second lease's token.
async fn leased_again_with_a_copy_left(
    key: &str,
) -> (
    NatsQueue,
    Purge,
    postbox::queue::Envelope,
    postbox::queue::LeaseToken,
) {
    let (q, purge) = make(options());
    let e = crate::suite::envelope(key);
    q.enqueue(e.clone()).await.unwrap();
    let first = q
        .lease(1, Duration::from_secs(1), crate::suite::at(0))
        .await
        .unwrap();
    assert_eq!(first[0].envelope.id, e.id);
    let subject = format!("postbox.{}.k.x{}", &q.streams().0[8..], hex(key.as_bytes()));
    let stream = q.jetstream().get_stream(q.streams().0).await.unwrap();
    let own = stream
        .get_last_raw_message_by_subject(subject.as_str())
        .await
        .unwrap()
        .sequence;
    let mut copy = e.clone();
    copy.attempts = 1;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Postbox-Id", e.id.to_string().as_str());
    headers.insert("Nats-Msg-Id", format!("{}.r{own}", e.id).as_str());
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        own.to_string().as_str(),
    );
    q.jetstream()
        .publish_with_headers(subject, headers, copy.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    // The first lease ended unsettled: the message is leased again, from what is held.
    let again = q
        .lease(1, Duration::from_secs(60), crate::suite::at(2))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].envelope.id, e.id);
    (q, purge, e, again[0].token)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A copy an earlier lease's retry left on the subject (its reply lost, then given up
/// on) goes with the message when a later lease dead-letters or acks it: the key is
/// free for a new enqueue, and the message is not replayed again. (The copy stayed:
/// every enqueue of the key was answered `Duplicate` of a dead message, and the copy
/// was replayed after its dead letter.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_left_by_an_earlier_lease_goes_with_the_message() {
    for dead in [true, false] {
        let (q, _purge, e, token) = leased_again_with_a_copy_left("k").await;
        if dead {
            q.dead_letter(token, "gave up").await.unwrap();
        } else {
            q.ack(&[token]).await.unwrap();
        }
        let next = crate::suite::envelope("k");
        assert_eq!(
            q.enqueue(next.clone()).await.unwrap(),
            Enqueued::Stored(next.id),
            "dead: {dead}"
        );
        let leased = q
            .lease(10, Duration::from_secs(60), crate::suite::at(3600))
            .await
            .unwrap();
        let ids: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
        assert_eq!(ids, [next.id], "dead: {dead}; {} replayed again", e.id);
    }
}

/// A retry of a later lease goes after such a copy, which is deleted: the message waits
/// for this retry's not-before, with this attempt counted. (The retry was dropped as the
/// copy's duplicate: the copy, due at once with the earlier attempts, was leased.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_copy_left_by_an_earlier_lease_keeps_its_not_before() {
    let (q, _purge, e, token) = leased_again_with_a_copy_left("k").await;
    q.retry_later(token, crate::suite::at(3600)).await.unwrap();
    let early = q
        .lease(10, Duration::from_secs(60), crate::suite::at(5))
        .await
        .unwrap();
    assert!(early.is_empty(), "leased before its not-before: {early:?}");
    let due = q
        .lease(10, Duration::from_secs(60), crate::suite::at(3600))
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].envelope.id, e.id);
    assert_eq!(due[0].envelope.attempts, 3, "two leases before, this one");
}

/// A live message another producer wrote without `Postbox-Id` (a valid envelope on its
/// key's subject) makes an enqueue of the key a `Duplicate` of it, its id read from its
/// envelope. (It failed as `Corrupt`: every deferral of the key failed while the
/// message was pending.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_written_without_postbox_id_is_a_duplicate_by_its_envelope() {
    let (q, _purge) = make(options());
    let e = crate::suite::envelope("k");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let subject = format!("postbox.{}.k.x{}", &q.streams().0[8..], hex(b"k"));
    q.jetstream()
        .publish_with_headers(subject, headers, e.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let again = crate::suite::envelope("k");
    assert_eq!(q.enqueue(again).await.unwrap(), Enqueued::Duplicate(e.id));
}

/// Two dead letters with one id are both redriven once, and discarded as listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dead_letters_with_one_id_are_both_redriven_once() {
    let (q, _purge) = make(options());
    crate::broker::two_dead_letters_with_one_id_are_both_redriven_once(q).await;
}

/// Two processes on one queue whose holds, together, reach `max_held` with retries
/// scheduled for later, each hold below it: a message due meanwhile is still leased.
/// (The consumer's `max_ack_pending` was `max_held`, for all processes together: the
/// server handed out nothing more, and neither hold was full enough to move its
/// retries aside, so the due message waited until the retries came due.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_message_is_leased_while_two_processes_hold_retries_for_later() {
    let opts = options().with_max_held(4);
    let (a, _purge) = make(opts.clone());
    let b = connect(opts).await;
    let lease_for = Duration::from_secs(30);
    for key in ["l1", "l2", "l3", "l4"] {
        let mut e = crate::suite::envelope(key);
        e.not_before = crate::suite::at(3600);
        a.enqueue(e).await.unwrap();
    }
    for q in [&a, &b] {
        let got = q.lease(2, lease_for, crate::suite::at(0)).await.unwrap();
        assert!(got.is_empty(), "{got:?}");
    }
    let due = a.enqueue(crate::suite::envelope("due")).await.unwrap().id();
    let mut got = Vec::new();
    for _ in 0..20 {
        got = a.lease(1, lease_for, crate::suite::at(0)).await.unwrap();
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids: Vec<_> = got.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, [due], "the due message waited behind the retries");
    drop(b);
}

/// A process connected without a capacity (a replayer, a tool) leaves the stream's
/// limit as another process set it: the producers still meet `Full` at their capacity.
/// (It set the stream's `max_msgs` to no limit, and their enqueues went on past it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_without_a_capacity_leaves_the_streams_limit() {
    let opts = options();
    let (producer, _purge) = make(opts.clone().with_capacity(2));
    let _replayer = connect(opts).await;
    let work = producer.streams().0.to_owned();
    let limit = producer
        .jetstream()
        .get_stream(&work)
        .await
        .unwrap()
        .cached_info()
        .config
        .max_messages;
    assert_eq!(limit, 2);
    for key in ["a", "b"] {
        producer.enqueue(crate::suite::envelope(key)).await.unwrap();
    }
    let full = producer.enqueue(crate::suite::envelope("c")).await;
    assert!(
        matches!(full, Err(QueueError::Full { capacity: 2 })),
        "{full:?}"
    );
}

/// `with_duplicate_window` is the dead-letter stream's window too, at creation and on
/// an existing stream: a dead letter published again after a lost reply is stored once
/// within it. (The dead-letter stream kept the server's 2 minutes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_duplicate_window_is_the_dead_letter_streams_too() {
    let hour = Duration::from_secs(3600);
    let opts = options().with_duplicate_window(hour);
    let (q, _purge) = make(opts.clone());
    let js = q.jetstream().clone();
    let dead = q.streams().1.to_owned();
    let window = async || {
        js.get_stream(&dead)
            .await
            .unwrap()
            .cached_info()
            .config
            .duplicate_window
    };
    assert_eq!(window().await, hour);
    let again = connect(opts.clone().with_duplicate_window(2 * hour)).await;
    assert_eq!(window().await, 2 * hour, "an existing one is updated");
    drop(again);
}
