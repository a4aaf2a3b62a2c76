//! Enqueue throughput of the broker queues at 64 concurrent producers (1 KiB bodies),
//! each next to the raw client's publish-with-ack loop in the same run.
//!
//! Needs the three servers on loopback (or `POSTBOX_{REDIS,NATS,AMQP}_URL`):
//! `cargo bench --features nats,redis,amqp --bench brokers`.
//!
//! Each adapter runs right after its broker's plain loop (the ratio the issue names),
//! then the raw client repeats the adapter's own server-side work, to show where the
//! difference goes. Every function writes to a destination of its own that is empty
//! when it starts and deleted when it ends (then the broker gets a moment to settle), so
//! no function runs while the broker is still digesting another's backlog: run after the
//! raw loop's hundreds of thousands of messages, the adapter used to be measured against
//! a broker busy moving them to disk (RabbitMQ most of all).

#![allow(missing_docs)] // bench crate

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use postbox::queue::{
    AmqpOptions, AmqpQueue, DeferReason, Envelope, MessageId, NatsOptions, NatsQueue, Queue,
    RedisOptions, RedisQueue,
};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;

const PRODUCERS: u64 = 64;

fn envelope() -> Envelope {
    Envelope::new(
        "api:443",
        "POST",
        "https://api/orders",
        Bytes::from(vec![b'x'; 1024]),
        DeferReason::CircuitOpen,
    )
}

/// `postbox/enqueue/<broker>/64_producers`: the adapter's durable enqueue, 64 producers;
/// then `purge` empties the adapter's queue and the broker gets a moment to settle.
fn bench_adapter<Q: Queue + Clone>(
    c: &mut Criterion,
    rt: &Runtime,
    broker: &str,
    q: &Q,
    purge: impl Future<Output = Result<(), postbox::queue::QueueError>>,
) {
    let mut g = c.benchmark_group("postbox");
    g.throughput(Throughput::Elements(1));
    let id = format!("enqueue/{broker}/64_producers");
    bench_loop(&mut g, rt, &id, q.clone(), |q| async move {
        q.enqueue(envelope()).await.unwrap();
    });
    g.finish();
    rt.block_on(purge).unwrap();
    settle(rt);
}

/// The group of the raw client's loops, one element per call.
fn raw_group(c: &mut Criterion) -> BenchmarkGroup<'_, WallTime> {
    let mut g = c.benchmark_group("raw");
    g.throughput(Throughput::Elements(1));
    g
}

/// One bench function: `op(ctx)` from 64 producers, with `ctx` cloned for every call.
fn bench_loop<T, F, Fut>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    id: &str,
    ctx: T,
    op: F,
) where
    T: Clone + Send + Sync + 'static,
    F: Fn(T) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    g.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (ctx, op) = (ctx.clone(), op.clone());
            spread(iters, move || op(ctx.clone()))
        })
    });
}

/// Runs `iters` operations spread over 64 tasks and returns the elapsed time.
async fn spread<F, Fut>(iters: u64, op: F) -> Duration
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let n = iters / PRODUCERS + u64::from(p < iters % PRODUCERS);
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                op().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

fn name() -> String {
    format!("bench-{:016x}", fastrand::u64(..))
}

/// Lets the broker finish the work a deleted destination left (bounded, bench only).
fn settle(rt: &Runtime) {
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(1)).await });
}

/// The `XADD` of the entry `RedisQueue` writes (module docs: `postbox::queue::redis`).
fn redis_entry(stream: &str, id: &str, payload: &[u8]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in [
        ("id", id.as_bytes()),
        ("idempotency_key", id.as_bytes()),
        ("destination", b"api:443"),
        ("method", b"POST"),
        ("uri", b"https://api/orders"),
        ("created_at_ms", b"1763820000000"),
        ("not_before_ms", b"1763820000000"),
        ("attempts", b"0"),
        ("claim", b"1"),
        ("envelope", payload),
    ] {
        cmd.arg(k).arg(v);
    }
    cmd
}

/// The raw client's plain loop body: one `XADD` of one field, the envelope.
async fn plain_xadd(raw: &mut redis::aio::ConnectionManager, key: &str, payload: Vec<u8>) {
    let _: String = redis::cmd("XADD")
        .arg(key)
        .arg("*")
        .arg("envelope")
        .arg(payload)
        .query_async(raw)
        .await
        .unwrap();
}

fn bench_redis(c: &mut Criterion, rt: &Runtime) {
    let q = rt
        .block_on(RedisQueue::connect(RedisOptions::new(name())))
        .expect("redis reachable (POSTBOX_REDIS_URL)");
    let raw = q.connection();
    let drop_key = |key: &str| {
        rt.block_on(async {
            let _: i64 = redis::cmd("DEL")
                .arg(key)
                .arg(format!("{key}:keys"))
                .query_async(&mut q.connection())
                .await
                .unwrap();
        });
        settle(rt);
    };
    let mut g = raw_group(c);
    let payload = envelope().encode();
    let raw_key = format!("postbox-bench-raw:{}", name());
    bench_loop(
        &mut g,
        rt,
        "redis/64_producers",
        (raw.clone(), raw_key.clone(), payload.clone()),
        |(mut raw, key, payload)| async move { plain_xadd(&mut raw, &key, payload).await },
    );
    drop_key(&raw_key);
    g.finish();
    bench_adapter(c, rt, "redis", &q, q.purge());
    let qc = rt
        .block_on(RedisQueue::connect(
            RedisOptions::new(name()).with_capacity(1 << 40),
        ))
        .unwrap();
    bench_adapter(c, rt, "redis_capacity", &qc, qc.purge());
    let mut g = raw_group(c);
    // The adapter's server-side work done by the raw client, one message per call:
    // the same ten-field entry, then also the idempotency-key claim pipelined after it.
    let raw_key = format!("postbox-bench-raw:{}", name());
    bench_loop(
        &mut g,
        rt,
        "redis/64_producers_same_entry",
        (raw.clone(), raw_key.clone(), payload.clone()),
        |(mut raw, key, payload)| async move {
            let _: String = redis_entry(&key, &MessageId::new_v7().to_string(), &payload)
                .query_async(&mut raw)
                .await
                .unwrap();
        },
    );
    drop_key(&raw_key);
    let raw_key = format!("postbox-bench-raw:{}", name());
    bench_loop(
        &mut g,
        rt,
        "redis/64_producers_same_entry_dedupe",
        (raw.clone(), raw_key.clone(), payload.clone()),
        |(mut raw, key, payload)| async move {
            let id = MessageId::new_v7().to_string();
            let keys = format!("{key}:keys");
            let (_eid, set): (String, i64) = redis::pipe()
                .add_command(redis_entry(&key, &id, &payload))
                .hset_nx(&keys, &id, &id)
                .query_async(&mut raw)
                .await
                .unwrap();
            assert_eq!(set, 1);
        },
    );
    drop_key(&raw_key);
    g.finish();
}

/// The `Postbox-*` headers the NATS adapter sets, for a message whose id and key are `id`.
fn postbox_headers(id: &str) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Postbox-Id", id);
    h.insert("Postbox-Idempotency-Key", id);
    h.insert("Postbox-Destination", "api:443");
    h.insert("Postbox-Not-Before", "1763820000000");
    h
}

/// The adapter's subject for the key `key` under the bench stream's `subject`.
fn key_subject(subject: &str, key: &str) -> String {
    let mut subj = format!("{subject}x.x");
    for b in key.as_bytes() {
        subj.push_str(&format!("{b:02x}"));
    }
    subj
}

fn bench_nats(c: &mut Criterion, rt: &Runtime) {
    let q = rt
        .block_on(NatsQueue::connect(NatsOptions::new(
            name().replace('-', "_"),
        )))
        .expect("nats reachable (POSTBOX_NATS_URL)");
    let js = q.jetstream().clone();
    // A fresh work-queue stream on file storage (as the adapter's) for each function.
    let new_stream = || {
        let raw_stream = format!("POSTBOX_BENCH_RAW_{:016x}", fastrand::u64(..));
        let raw_subject = format!("postbox-bench-raw.{raw_stream}");
        rt.block_on(js.create_stream(async_nats::jetstream::stream::Config {
            name: raw_stream.clone(),
            subjects: vec![raw_subject.clone(), format!("{raw_subject}x.*")],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        }))
        .unwrap();
        (raw_stream, raw_subject)
    };
    let drop_stream = |stream: &str| {
        rt.block_on(js.delete_stream(stream)).unwrap();
        settle(rt);
    };
    let mut g = raw_group(c);
    let payload = Bytes::from(envelope().encode());
    let (raw_stream, raw_subject) = new_stream();
    bench_loop(
        &mut g,
        rt,
        "nats/64_producers",
        (js.clone(), raw_subject.clone(), payload.clone()),
        |(js, subject, payload)| async move {
            js.publish(subject, payload).await.unwrap().await.unwrap();
        },
    );
    drop_stream(&raw_stream);
    g.finish();
    bench_adapter(c, rt, "nats", &q, q.purge());
    let mut g = raw_group(c);
    let (mut raw_stream, raw_subject) = new_stream();
    bench_loop(
        &mut g,
        rt,
        "nats/64_producers_unique_subject_expected",
        (js.clone(), raw_subject.clone(), payload.clone()),
        |(js, subject, payload)| async move {
            let subj = format!("{subject}x.{:016x}", fastrand::u64(..));
            let p = async_nats::jetstream::message::PublishMessage::build()
                .payload(payload)
                .expected_last_subject_sequence(0);
            js.send_publish(subj, p).await.unwrap().await.unwrap();
        },
    );
    drop_stream(&raw_stream);
    let (next, raw_subject) = new_stream();
    raw_stream = next;
    bench_loop(
        &mut g,
        rt,
        "nats/64_producers_key_subject_expected",
        (js.clone(), raw_subject.clone(), payload.clone()),
        |(js, subject, payload)| async move {
            let id = MessageId::new_v7().to_string();
            let subj = key_subject(&subject, &id);
            let p = async_nats::jetstream::message::PublishMessage::build()
                .payload(payload)
                .expected_last_subject_sequence(0);
            js.send_publish(subj, p).await.unwrap().await.unwrap();
        },
    );
    // What the adapter publishes, by the raw client: a subject per key, the
    // expected-last-subject-sequence check and the `Postbox-*` headers; first with a
    // `Nats-Msg-Id` as well (as the adapter did until 2026-12-06, for comparison).
    for (id, msg_id) in [
        ("nats/64_producers_same_message_msg_id", true),
        ("nats/64_producers_same_message", false),
    ] {
        drop_stream(&raw_stream);
        let (next, raw_subject) = new_stream();
        raw_stream = next;
        bench_loop(
            &mut g,
            rt,
            id,
            (js.clone(), raw_subject.clone(), payload.clone()),
            move |(js, subject, payload)| async move {
                let id = MessageId::new_v7().to_string();
                let subj = key_subject(&subject, &id);
                let mut p = async_nats::jetstream::message::PublishMessage::build()
                    .payload(payload)
                    .headers(postbox_headers(&id))
                    .expected_last_subject_sequence(0);
                if msg_id {
                    p = p.message_id(&id);
                }
                js.send_publish(subj, p).await.unwrap().await.unwrap();
            },
        );
    }
    drop_stream(&raw_stream);
    let (raw_stream, raw_subject) = new_stream();
    // The literal design, which the adapter does not use (docs/queues.md,
    // "De-duplication"): one subject, the idempotency key as `Nats-Msg-Id` (so
    // de-duplication only within `duplicate_window`, and a key stays refused for the
    // window after its message is acked), with the `Postbox-*` headers.
    bench_loop(
        &mut g,
        rt,
        "nats/64_producers_msg_id_headers",
        (js.clone(), raw_subject.clone(), payload.clone()),
        |(js, subject, payload)| async move {
            let id = MessageId::new_v7().to_string();
            let p = async_nats::jetstream::message::PublishMessage::build()
                .payload(payload)
                .headers(postbox_headers(&id))
                .message_id(&id);
            js.send_publish(subject, p).await.unwrap().await.unwrap();
        },
    );
    drop_stream(&raw_stream);
    let (raw_stream, raw_subject) = new_stream();
    bench_loop(
        &mut g,
        rt,
        "nats/64_producers_unique_subject",
        (js.clone(), raw_subject.clone(), payload.clone()),
        |(js, subject, payload)| async move {
            let subj = format!("{subject}x.{:016x}", fastrand::u64(..));
            js.publish(subj, payload).await.unwrap().await.unwrap();
        },
    );
    drop_stream(&raw_stream);
    g.finish();
}

fn bench_amqp(c: &mut Criterion, rt: &Runtime) {
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let q = rt
        .block_on(AmqpQueue::connect(AmqpOptions::new(name())))
        .expect("rabbitmq reachable (POSTBOX_AMQP_URL)");
    let ch = rt.block_on(q.channel()).unwrap();
    // A fresh durable quorum queue, as the adapter's, for each function.
    let new_queue = || {
        let raw_queue = format!("postbox-bench-raw.{}", name());
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(b"quorum".to_vec())),
        );
        rt.block_on(ch.queue_declare(
            &raw_queue,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        ))
        .unwrap();
        raw_queue
    };
    let drop_queue = |queue: &str| {
        rt.block_on(ch.queue_delete(queue, QueueDeleteOptions::default()))
            .unwrap();
        settle(rt);
    };
    let raw_queue = new_queue();
    let mut g = raw_group(c);
    let payload = Arc::new(envelope().encode());
    bench_loop(
        &mut g,
        rt,
        "amqp/64_producers",
        (ch.clone(), raw_queue.clone(), payload.clone()),
        |(ch, queue, payload)| async move {
            let props = lapin::BasicProperties::default().with_delivery_mode(2);
            ch.basic_publish("", &queue, BasicPublishOptions::default(), &payload, props)
                .await
                .unwrap()
                .await
                .unwrap();
        },
    );
    drop_queue(&raw_queue);
    g.finish();
    bench_adapter(c, rt, "amqp", &q, q.purge());
    let mut g = raw_group(c);
    let raw_queue = new_queue();
    // The adapter's exact message from the raw client: its headers and properties,
    // mandatory, the envelope encoded per call.
    bench_loop(
        &mut g,
        rt,
        "amqp/64_producers_same_message",
        (ch.clone(), raw_queue.clone()),
        |(ch, queue)| async move {
            let env = envelope();
            let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
            let mut headers = FieldTable::default();
            headers.insert("postbox-idempotency-key".into(), text(&env.idempotency_key));
            headers.insert("postbox-destination".into(), text(&env.destination));
            headers.insert("postbox-not-before".into(), AMQPValue::LongLongInt(0));
            headers.insert("postbox-created-at".into(), AMQPValue::LongLongInt(0));
            headers.insert("postbox-attempts".into(), AMQPValue::LongLongInt(0));
            let props = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/vnd.postbox.envelope".into())
                .with_message_id(env.id.to_string().into())
                .with_headers(headers);
            let options = BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            };
            ch.basic_publish("", &queue, options, &env.encode(), props)
                .await
                .unwrap()
                .await
                .unwrap();
        },
    );
    drop_queue(&raw_queue);
    g.finish();
}

/// `…/redis_fsync/…`: the plain loop and the adapter against a private `redis-server`
/// in the durable configuration the docs give (`appendonly yes`, `appendfsync always`),
/// on a port of its own and a temporary directory; the shared server keeps nothing on
/// disk. Skipped, with a note, where there is no `redis-server` binary to start.
fn bench_redis_fsync(c: &mut Criterion, rt: &Runtime) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let child = std::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn();
    let Ok(child) = child else {
        eprintln!("no redis-server to start: the redis_fsync functions are skipped");
        return;
    };
    /// Stops the private server however the bench ends (a panic included).
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Stop(child);
    let url = format!("redis://127.0.0.1:{port}/");
    let q = rt.block_on(async {
        for _ in 0..100 {
            let options = RedisOptions::new(name()).with_url(url.clone());
            if let Ok(q) = RedisQueue::connect(options).await {
                return q;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the private redis-server on port {port} did not answer");
    });
    let raw = q.connection();
    let mut g = raw_group(c);
    let payload = envelope().encode();
    let raw_key = format!("postbox-bench-raw:{}", name());
    bench_loop(
        &mut g,
        rt,
        "redis_fsync/64_producers",
        (raw, raw_key.clone(), payload),
        |(mut raw, key, payload)| async move { plain_xadd(&mut raw, &key, payload).await },
    );
    g.finish();
    // Gone before the adapter's run, as in `bench_redis`: the server does not carry
    // (nor rewrite its append-only file over) the plain loop's stream meanwhile.
    rt.block_on(async {
        let _: i64 = redis::cmd("DEL")
            .arg(&raw_key)
            .query_async(&mut q.connection())
            .await
            .unwrap();
    });
    settle(rt);
    bench_adapter(c, rt, "redis_fsync", &q, q.purge());
}

fn brokers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    bench_redis(c, &rt);
    bench_redis_fsync(c, &rt);
    bench_nats(c, &rt);
    bench_amqp(c, &rt);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = brokers
}
criterion_main!(benches);
