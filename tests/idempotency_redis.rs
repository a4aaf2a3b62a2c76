//! `RedisStore` against the Redis server on loopback (`POSTBOX_REDIS_URL`, by default
//! `redis://127.0.0.1:6379`): it fails, loudly, if the server is unreachable.
//!
//! Claims expire on the server's clock, so the tests that wait for an expiry poll in
//! real time, for at most a few seconds.

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use postbox::idempotency::{
    Claim, FingerprintedBody, IdempotencyLayer, IdempotencyStore, REPLAYED_HEADER, RedisStore,
    StoredResponse,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::{Layer, ServiceExt, service_fn};

#[allow(unreachable_pub)] // the proxy of the conformance suite, shared
#[path = "queue_conformance/proxy.rs"]
mod proxy;

fn url() -> String {
    std::env::var("POSTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A store with a prefix of its own (a fresh one per call unless `prefix` is given), on
/// a connection of its own: another instance of the service.
async fn instance(prefix: &str) -> RedisStore {
    let url = url();
    RedisStore::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("Redis is not reachable at {url}: {e}"))
        .prefix(prefix)
}

fn fresh_prefix() -> String {
    format!("postbox:test:idem:{:016x}:", fastrand::u64(..))
}

fn response(body: &'static str) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "text/plain".parse().unwrap());
    headers.append("set-cookie", "a=1".parse().unwrap());
    headers.append("set-cookie", "b=2".parse().unwrap());
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    StoredResponse {
        status: StatusCode::CREATED,
        headers,
        body: Bytes::from_static(body.as_bytes()),
        trailers: Some(trailers),
        fingerprint: Some(postbox::idempotency::Fingerprint {
            hash: 7,
            body_len: 9,
        }),
    }
}

/// Two instances of one service (one prefix, a connection each).
async fn two_instances() -> (RedisStore, RedisStore) {
    let prefix = fresh_prefix();
    (instance(&prefix).await, instance(&prefix).await)
}

/// Claims `key`, which no request holds: its token.
async fn claim_fresh(
    store: &RedisStore,
    key: &str,
    lock_for: Duration,
) -> postbox::idempotency::ClaimToken {
    match store.claim(key, lock_for).await.unwrap() {
        Claim::Proceed(token) => token,
        other => panic!("a fresh key is claimed, not {other:?}"),
    }
}

/// Polls `claim` until it answers `Proceed` (a claim expiring on the server's clock),
/// for at most 2 s.
async fn claim_once_free(store: &RedisStore, key: &str) -> postbox::idempotency::ClaimToken {
    for _ in 0..100 {
        if let Claim::Proceed(t) = store.claim(key, LOCK).await.unwrap() {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{key} still claimed after 2 s");
}

const LOCK: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_key_claimed_on_one_instance_is_in_progress_on_another_then_answered() {
    let (a, b) = two_instances().await;
    let token = claim_fresh(&a, "k", LOCK).await;
    assert_eq!(b.claim("k", LOCK).await.unwrap(), Claim::InProgress);
    a.complete("k", token, response("order 42"), TTL)
        .await
        .unwrap();
    assert_eq!(
        b.claim("k", LOCK).await.unwrap(),
        Claim::Done(response("order 42"))
    );
    // Other keys, and the same key under another prefix, are apart.
    assert!(matches!(
        b.claim("j", LOCK).await.unwrap(),
        Claim::Proceed(_)
    ));
    let other = instance(&fresh_prefix()).await;
    assert!(matches!(
        other.claim("k", LOCK).await.unwrap(),
        Claim::Proceed(_)
    ));
}

/// A claim that expired and was taken over cannot be completed, extended or released by
/// its first holder: only the new holder's token acts on the key.
#[tokio::test]
async fn a_claim_taken_over_is_left_to_its_new_holder() {
    let (a, b) = two_instances().await;
    let first = claim_fresh(&a, "k", Duration::from_millis(50)).await;
    // Taken over once the first claim expired (on the server's clock).
    let second = claim_once_free(&b, "k").await;
    assert_ne!(first, second);

    assert!(!a.extend("k", first, LOCK).await.unwrap());
    assert!(!a.release_now("k", first).await.unwrap());
    a.complete("k", first, response("stale"), TTL)
        .await
        .unwrap();
    assert_eq!(a.claim("k", LOCK).await.unwrap(), Claim::InProgress);

    assert!(b.extend("k", second, LOCK).await.unwrap());
    b.complete("k", second, response("fresh"), TTL)
        .await
        .unwrap();
    assert_eq!(
        a.claim("k", LOCK).await.unwrap(),
        Claim::Done(response("fresh"))
    );
    // A completed key is no claim: it cannot be released or extended.
    assert!(!b.release_now("k", second).await.unwrap());
    assert!(!b.extend("k", second, LOCK).await.unwrap());
}

/// A handler that outlived its claim (renewals lost in a blip of the store) while no
/// other request claimed the key still has its response remembered: a repeat is
/// answered, not run again.
#[tokio::test]
async fn a_response_whose_claim_expired_untaken_is_remembered() {
    let (a, b) = two_instances().await;
    let token = claim_fresh(&a, "k", Duration::from_millis(50)).await;
    // Until the claim has expired on the server's clock (without claiming the key).
    let mut raw = redis_connection().await;
    let mut expired = false;
    for _ in 0..100 {
        let exists: bool = redis::cmd("EXISTS")
            .arg(a.redis_key("k"))
            .query_async(&mut raw)
            .await
            .unwrap();
        if !exists {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(expired, "the claim did not expire within 2 s");
    a.complete("k", token, response("late"), TTL).await.unwrap();
    assert_eq!(
        b.claim("k", LOCK).await.unwrap(),
        Claim::Done(response("late"))
    );
}

async fn redis_connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis is not reachable at {}: {e}", url()))
}

/// Stores `value` under `key` for a minute, behind the store's back.
async fn set_for_a_minute(raw: &mut redis::aio::MultiplexedConnection, key: &str, value: &[u8]) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(60_000)
        .query_async(raw)
        .await
        .unwrap();
}

/// A remembered response this version cannot read (written by a newer one, during a
/// rolling deploy) is answered as in progress: the handler is not run again.
#[tokio::test]
async fn an_unreadable_response_is_not_taken_for_a_free_key() {
    let prefix = fresh_prefix();
    let store = instance(&prefix).await;
    let mut raw = redis_connection().await;
    set_for_a_minute(
        &mut raw,
        &store.redis_key("k"),
        b"D\xff from a newer version",
    )
    .await;
    assert_eq!(store.claim("k", LOCK).await.unwrap(), Claim::InProgress);
}

/// A repeat of a key whose remembered response is in an encoding this version cannot
/// read fetches only its version, not the whole response: a repeat waits on it as in
/// progress, claiming again every 50 ms for `lock_for` (about 1 200 claims of up to
/// `max_body` each, before the fix).
#[tokio::test]
async fn a_response_in_another_version_is_not_fetched_whole() {
    let prefix = fresh_prefix();
    let store = instance(&prefix).await;
    let mut raw = redis_connection().await;
    let mut value = b"D\xff".to_vec();
    value.resize(4 << 20, b'x');
    set_for_a_minute(&mut raw, &store.redis_key("k"), &value).await;
    // Once first: the script loaded, so the measured claim is one round trip.
    assert_eq!(store.claim("k", LOCK).await.unwrap(), Claim::InProgress);
    let sent = async |raw: &mut redis::aio::MultiplexedConnection| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(raw)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = sent(&mut raw).await;
    assert_eq!(store.claim("k", LOCK).await.unwrap(), Claim::InProgress);
    let after = sent(&mut raw).await;
    // Other tests run meanwhile: far less than the 4 MiB value all the same.
    assert!(after - before < 1 << 20, "{} bytes sent", after - before);
}

/// `release` (called from `Drop`) frees the key on a task of its own.
#[tokio::test]
async fn a_released_claim_frees_the_key() {
    let (a, b) = two_instances().await;
    let token = claim_fresh(&a, "k", LOCK).await;
    a.release("k", token);
    claim_once_free(&b, "k").await;
}

/// A claim dropped after its script ran but before its answer was read (the request
/// cancelled) is released: nobody holds it. (The key stayed in progress, for nobody,
/// for `lock_for`.)
#[tokio::test]
async fn a_claim_dropped_before_its_answer_is_read_frees_the_key() {
    let (a, b) = two_instances().await;
    let mut raw = redis_connection().await;
    // The claim script in the server's cache first: on a server that has not run it
    // (a fresh one), the pinned claim's `EVALSHA` is refused `NOSCRIPT`, and the
    // script is sent again only when the claim is polled again, which it is not.
    let warm = claim_fresh(&a, "warm", LOCK).await;
    a.release_now("warm", warm).await.unwrap();
    let mut claiming = Box::pin(a.claim("k", LOCK));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(claiming.as_mut().poll(cx)));
    assert!(first.await.is_pending(), "answered without a round trip");
    // Until the claim is on the server (the answer, on its way back, is never read).
    let mut taken = false;
    for _ in 0..200 {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(a.redis_key("k"))
            .query_async(&mut raw)
            .await
            .unwrap();
        if exists == 1 {
            taken = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(taken, "the claim never reached the server");
    drop(claiming);
    claim_once_free(&b, "k").await;
}

type Served = Request<FingerprintedBody<Full<Bytes>>>;

fn keyed(key: &str) -> Request<Full<Bytes>> {
    Request::post("http://shop.test/orders")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::from("{\"sku\":7}"))
        .unwrap()
}

/// The server's `Idempotency` layer on `RedisStore`: a repeat that reaches another
/// instance, or the same one after a restart (a new store, a new connection), is
/// answered from Redis; the handler runs once.
#[tokio::test]
async fn a_repeat_on_another_instance_or_after_a_restart_does_not_run_the_handler_again() {
    let prefix = fresh_prefix();
    let calls = Arc::new(AtomicUsize::new(0));
    let server = |store: RedisStore| {
        let calls = calls.clone();
        IdempotencyLayer::with_store(Arc::new(store)).layer(service_fn(move |req: Served| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                // Read whole, so the body is in the fingerprint.
                req.into_body().collect().await.unwrap();
                let mut res = Response::new(Full::<Bytes>::from(format!("order #{n}")));
                *res.status_mut() = StatusCode::CREATED;
                res.headers_mut()
                    .insert("grpc-status", "0".parse().unwrap());
                Ok::<_, std::convert::Infallible>(res)
            }
        }))
    };
    let first = server(instance(&prefix).await);
    let res = first.clone().oneshot(keyed("order-7")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "order #1");

    for repeat in [server(instance(&prefix).await), first] {
        let res = repeat.oneshot(keyed("order-7")).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        assert!(res.headers().contains_key(REPLAYED_HEADER));
        assert_eq!(res.headers()["grpc-status"], "0");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "order #1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The same key for another request is refused, from the fingerprint kept in Redis.
    let other = server(instance(&prefix).await);
    let mut changed = keyed("order-7");
    *changed.body_mut() = Full::from("{\"sku\":8}");
    let res = other.oneshot(changed).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unreachable_server_is_an_error_at_connect() {
    let err = RedisStore::connect("redis://127.0.0.1:1")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");
    let err = RedisStore::connect("not a url").await.unwrap_err();
    assert!(err.to_string().contains("invalid"), "{err}");
}

/// The configured server stack on `RedisStore`: two instances answer a key once.
#[tokio::test]
async fn the_configured_server_stack_shares_keys_through_redis() {
    use postbox::config::ServerConfig;
    let prefix = fresh_prefix();
    let calls = Arc::new(AtomicUsize::new(0));
    let server = |store: RedisStore| {
        let calls = calls.clone();
        ServerConfig::server()
            .layer_with_store(Arc::new(store))
            .unwrap()
            .layer(service_fn(move |req: Served| {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    req.into_body().collect().await.unwrap();
                    let mut res = Response::new(Full::<Bytes>::from(format!("order #{n}")));
                    *res.status_mut() = StatusCode::CREATED;
                    Ok::<_, std::convert::Infallible>(res)
                }
            }))
    };
    for instance in [
        server(instance(&prefix).await),
        server(instance(&prefix).await),
    ] {
        let res = instance.oneshot(keyed("order-9")).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "order #1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A server that stops answering without closing the connection (a host gone, a
/// partition; here a proxy freezes it): a claim times out, and the store makes its
/// connection again, so claims succeed within seconds (redis-rs's connection manager
/// alone kept the silent socket, failing every claim for about 15 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_answering_is_made_again() {
    let proxy = proxy::Proxy::start(proxy::host_port(&url())).await;
    let through = url().replacen(&proxy::host_port(&url()), &proxy.addr().to_string(), 1);
    let store = RedisStore::connect_with(&through, Duration::from_millis(300))
        .await
        .unwrap()
        .prefix(fresh_prefix());
    assert!(matches!(
        store.claim("before", LOCK).await.unwrap(),
        Claim::Proceed(_)
    ));
    let connections = proxy.accepted();
    proxy.freeze();
    store.claim("frozen", LOCK).await.unwrap_err();
    let start = tokio::time::Instant::now();
    loop {
        match store.claim("after", LOCK).await {
            // A try that timed out may have claimed the key all the same.
            Ok(_) => break,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "still unanswered after 15 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(proxy.accepted() > connections, "no new connection was made");
}
