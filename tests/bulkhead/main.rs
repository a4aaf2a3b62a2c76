//! Behaviour of the `Bulkhead`.

use postbox::BoxError;
use postbox::bulkhead::BulkheadLayer;
use postbox::bulkhead::error::Full;
use postbox::error::find_cause;
use std::time::Duration;
use tokio::time;
use tokio_test::{assert_pending, assert_ready, assert_ready_err, assert_ready_ok};
use tower::Layer;
use tower_test::mock::{self, Spawn};

type Mock = mock::Mock<u32, u32>;

fn callers(
    layer: &BulkheadLayer,
    n: usize,
) -> (
    Vec<Spawn<postbox::bulkhead::Bulkhead<Mock>>>,
    mock::Handle<u32, u32>,
) {
    let (mock, handle) = mock::pair::<u32, u32>();
    let svc = layer.layer(mock);
    ((0..n).map(|_| Spawn::new(svc.clone())).collect(), handle)
}

/// A bulkhead of one permit and one waiter, who waits at most `max_wait`.
fn one_permit_one_waiter(max_wait: Duration) -> BulkheadLayer {
    BulkheadLayer::builder()
        .max_concurrent(1)
        .max_waiting(1)
        .max_wait(max_wait)
        .build()
        .unwrap()
}

fn is_full(err: &BoxError) -> bool {
    find_cause::<Full>(&**err).is_some()
}

#[tokio::test(start_paused = true)]
async fn rejects_the_caller_after_max_concurrent_plus_max_waiting_at_once() {
    let layer = BulkheadLayer::builder()
        .max_concurrent(2)
        .max_waiting(1)
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    let (mut c, _handle) = callers(&layer, 4);

    // Two in flight.
    assert_ready_ok!(c[0].poll_ready());
    let _f0 = c[0].call(0);
    assert_ready_ok!(c[1].poll_ready());
    let _f1 = c[1].call(1);
    // One waits.
    assert_pending!(c[2].poll_ready());
    // The fourth is rejected at once: ready, and its call fails immediately.
    assert_ready_ok!(c[3].poll_ready());
    let mut f3 = tokio_test::task::spawn(c[3].call(3));
    let err = assert_ready_err!(f3.poll());
    let full = find_cause::<Full>(&*err).unwrap();
    assert_eq!(full.waited(), None);
    assert_eq!(full.max_concurrent(), 2);
}

#[tokio::test(start_paused = true)]
async fn fail_fast_by_default_rejects_when_all_permits_are_taken() {
    let layer = BulkheadLayer::new(1).unwrap();
    let (mut c, _handle) = callers(&layer, 2);
    assert_ready_ok!(c[0].poll_ready());
    let _f0 = c[0].call(0);
    assert_ready_ok!(c[1].poll_ready());
    assert!(is_full(&c[1].call(1).await.unwrap_err()));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_times_out_after_exactly_max_wait() {
    let layer = one_permit_one_waiter(Duration::from_millis(250));
    let (mut c, _handle) = callers(&layer, 2);
    assert_ready_ok!(c[0].poll_ready());
    let _f0 = c[0].call(0);

    assert_pending!(c[1].poll_ready());
    time::advance(Duration::from_millis(249)).await;
    assert_pending!(c[1].poll_ready());
    time::advance(Duration::from_millis(1)).await;
    assert_ready_ok!(c[1].poll_ready());
    let err = c[1].call(1).await.unwrap_err();
    assert_eq!(
        find_cause::<Full>(&*err).unwrap().waited(),
        Some(Duration::from_millis(250))
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_polled_late_reports_how_long_it_really_waited() {
    let layer = one_permit_one_waiter(Duration::from_millis(50));
    let (mut c, _handle) = callers(&layer, 2);
    assert_ready_ok!(c[0].poll_ready());
    let _f0 = c[0].call(0);

    assert_pending!(c[1].poll_ready());
    // Its task is not polled again until long after the timer fired.
    time::advance(Duration::from_millis(500)).await;
    assert_ready_ok!(c[1].poll_ready());
    let err = c[1].call(1).await.unwrap_err();
    assert_eq!(
        find_cause::<Full>(&*err).unwrap().waited(),
        Some(Duration::from_millis(500))
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_gets_the_permit_a_finished_call_releases() {
    let layer = one_permit_one_waiter(Duration::from_secs(1));
    let (mut c, mut handle) = callers(&layer, 2);
    assert_ready_ok!(c[0].poll_ready());
    let mut f0 = tokio_test::task::spawn(c[0].call(0));
    assert_pending!(c[1].poll_ready());

    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(10);
    assert_eq!(assert_ready_ok!(f0.poll()), 10);
    assert!(c[1].is_woken());
    assert_ready_ok!(c[1].poll_ready());
    let mut f1 = tokio_test::task::spawn(c[1].call(1));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 1);
    send.send_response(11);
    assert_eq!(assert_ready_ok!(f1.poll()), 11);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_future_releases_its_permit() {
    let layer = BulkheadLayer::new(1).unwrap();
    let (mut c, _handle) = callers(&layer, 2);
    assert_ready_ok!(c[0].poll_ready());
    let f0 = c[0].call(0);
    assert_eq!(layer.available_permits(), 0);
    drop(f0);
    assert_eq!(layer.available_permits(), 1);
    assert_ready_ok!(c[1].poll_ready());
    let _f1 = c[1].call(1);
    assert_eq!(layer.available_permits(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_ready_service_releases_its_reserved_permit() {
    let layer = BulkheadLayer::new(1).unwrap();
    let (mut c, _handle) = callers(&layer, 1);
    assert_ready_ok!(c[0].poll_ready());
    assert_eq!(layer.available_permits(), 0);
    drop(c);
    assert_eq!(layer.available_permits(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_gives_back_its_waiting_slot() {
    let layer = one_permit_one_waiter(Duration::from_secs(1));
    let (mut c, _handle) = callers(&layer, 3);
    assert_ready_ok!(c[0].poll_ready());
    let _f0 = c[0].call(0);
    assert_pending!(c[1].poll_ready());
    drop(c.remove(1));
    // The slot is free again: the next caller waits instead of being rejected.
    assert_pending!(c[1].poll_ready());
}

#[tokio::test(start_paused = true)]
async fn a_rejection_does_not_poison_the_service() {
    let layer = BulkheadLayer::new(1).unwrap();
    let (mut c, mut handle) = callers(&layer, 2);
    assert_ready_ok!(c[0].poll_ready());
    let mut f0 = tokio_test::task::spawn(c[0].call(0));
    assert_ready_ok!(c[1].poll_ready());
    assert!(is_full(&c[1].call(1).await.unwrap_err()));

    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(0);
    assert_ready_ok!(f0.poll());
    assert_ready_ok!(c[1].poll_ready());
    let _f1 = c[1].call(1);
    assert_eq!(handle.next_request().await.unwrap().0, 1);
}

/// A service found full by `poll_ready` takes a permit freed before it is polled
/// again, instead of failing a call that now fits (a cache of ready services, like
/// tower's `ReadyCache`, polls again before it calls).
#[tokio::test(start_paused = true)]
async fn a_rejected_service_takes_a_permit_freed_before_its_next_poll_ready() {
    let layer = BulkheadLayer::new(1).unwrap();
    let (mut c, mut handle) = callers(&layer, 2);
    assert_ready_ok!(c[0].poll_ready());
    let mut f0 = tokio_test::task::spawn(c[0].call(0));
    assert_ready_ok!(c[1].poll_ready()); // full: ready to reject
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(0);
    assert_ready_ok!(f0.poll()); // the permit is free again
    assert_ready_ok!(c[1].poll_ready());
    // Called through (pending on the mock), not rejected (ready with `Full`).
    let mut f1 = tokio_test::task::spawn(c[1].call(1));
    assert_pending!(f1.poll());
    assert_eq!(handle.next_request().await.unwrap().0, 1);
}

/// A service rejected because the waiting slots were taken waits in one freed since
/// when it is polled again, instead of failing with its stale rejection.
#[tokio::test(start_paused = true)]
async fn a_rejected_service_waits_in_a_slot_freed_before_its_next_poll_ready() {
    let layer = one_permit_one_waiter(Duration::from_secs(1));
    let (mut c, mut handle) = callers(&layer, 3);
    assert_ready_ok!(c[0].poll_ready());
    let mut f0 = tokio_test::task::spawn(c[0].call(0));
    assert_pending!(c[1].poll_ready()); // waits
    assert_ready_ok!(c[2].poll_ready()); // no slot: ready to reject
    drop(c.remove(1)); // the waiter leaves; its slot is free
    assert_pending!(c[1].poll_ready(), "waits in the freed slot");
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(0);
    assert_ready_ok!(f0.poll());
    assert!(c[1].is_woken(), "the waiter was not woken by the release");
    assert_ready_ok!(c[1].poll_ready());
    let mut f2 = tokio_test::task::spawn(c[1].call(2));
    assert_pending!(f2.poll());
    assert_eq!(handle.next_request().await.unwrap().0, 2);
}

/// A service that waited its whole `max_wait` and was rejected is not sent to wait
/// again when polled again (a cache of ready services polls before it calls): it stays
/// rejected, and its call fails with `Full`, unless a permit is free by then.
#[tokio::test(start_paused = true)]
async fn a_service_rejected_after_waiting_does_not_wait_again_when_polled_again() {
    let layer = one_permit_one_waiter(Duration::from_secs(1));
    let (mut c, mut handle) = callers(&layer, 2);
    assert_ready_ok!(c[0].poll_ready());
    let _running = c[0].call(0);
    assert_pending!(c[1].poll_ready());
    time::advance(Duration::from_secs(1)).await;
    assert_ready_ok!(c[1].poll_ready()); // waited its bound: ready to reject
    for _ in 0..3 {
        assert_ready_ok!(
            c[1].poll_ready(),
            "polled again: still rejected, not waiting"
        );
    }
    let err = c[1].call(1).await.unwrap_err();
    let full = find_cause::<Full>(&*err).expect("Full");
    assert_eq!(full.waited(), Some(Duration::from_secs(1)));
    assert_eq!(handle.next_request().await.unwrap().0, 0);
    assert!(
        handle.poll_request().is_pending(),
        "the rejected call was sent"
    );
}

#[tokio::test(start_paused = true)]
async fn backpressure_waits_as_long_as_it_takes() {
    let layer = BulkheadLayer::builder()
        .max_concurrent(1)
        .backpressure()
        .build()
        .unwrap();
    let (mut c, mut handle) = callers(&layer, 3);
    assert_ready_ok!(c[0].poll_ready());
    let mut f0 = tokio_test::task::spawn(c[0].call(0));
    assert_pending!(c[1].poll_ready());
    assert_pending!(c[2].poll_ready());
    time::advance(Duration::from_secs(3600)).await;
    assert_pending!(c[1].poll_ready());

    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(0);
    assert_ready_ok!(f0.poll());
    assert!(
        c[1].is_woken(),
        "the first waiter was not woken by the release"
    );
    assert_ready_ok!(c[1].poll_ready());
}

/// A waiter woken for a freed permit that is dropped before it polls hands the wake-up
/// on: the next waiter is woken and gets the permit (else it would wait for a release
/// that may never come).
#[tokio::test(start_paused = true)]
async fn a_woken_waiter_dropped_before_it_polls_wakes_the_next() {
    for layer in [
        BulkheadLayer::builder()
            .max_concurrent(1)
            .backpressure()
            .build()
            .unwrap(),
        BulkheadLayer::builder()
            .max_concurrent(1)
            .max_waiting(2)
            .max_wait(Duration::from_secs(60))
            .build()
            .unwrap(),
    ] {
        let (mut c, mut handle) = callers(&layer, 3);
        assert_ready_ok!(c[0].poll_ready());
        let mut f0 = tokio_test::task::spawn(c[0].call(0));
        assert_pending!(c[1].poll_ready());
        assert_pending!(c[2].poll_ready());
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(0);
        assert_ready_ok!(f0.poll());
        assert!(c[1].is_woken(), "{layer:?}: the first waiter was not woken");
        drop(c.remove(1));
        assert!(
            c[1].is_woken(),
            "{layer:?}: the wake-up was lost with the dropped waiter"
        );
        assert_ready_ok!(c[1].poll_ready());
    }
}

#[tokio::test(start_paused = true)]
async fn inner_readiness_is_respected_while_holding_a_permit() {
    let layer = BulkheadLayer::new(2).unwrap();
    let (mut c, mut handle) = callers(&layer, 1);
    handle.allow(0);
    assert_pending!(c[0].poll_ready());
    assert_eq!(layer.available_permits(), 1);
    handle.allow(1);
    assert_ready_ok!(c[0].poll_ready());
}

#[test]
fn invalid_configuration_is_an_error_not_a_panic() {
    assert_eq!(
        BulkheadLayer::new(0).unwrap_err().field(),
        "bulkhead.max_concurrent"
    );
    let e = BulkheadLayer::builder().max_waiting(3).build().unwrap_err();
    assert_eq!(e.field(), "bulkhead.max_wait", "a wait with no bound");
    let e = BulkheadLayer::builder()
        .max_waiting(3)
        .max_wait(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(e.field(), "bulkhead.max_wait");
    assert!(BulkheadLayer::new(usize::MAX).is_err());
}

#[tokio::test(start_paused = true)]
async fn the_rejection_future_is_ready_without_polling_inner() {
    let layer = BulkheadLayer::new(1).unwrap();
    let (mut c, mut handle) = callers(&layer, 2);
    assert_ready_ok!(c[0].poll_ready());
    let _f0 = c[0].call(0);
    assert_ready_ok!(c[1].poll_ready());
    let mut f1 = tokio_test::task::spawn(c[1].call(1));
    assert!(assert_ready!(f1.poll()).is_err());
    let (first, _send) = handle.next_request().await.unwrap();
    assert_eq!(first, 0);
    assert_pending!(handle.poll_request());
}

/// Many callers on several worker threads: the bulkhead never admits more than
/// `max_concurrent` at once, and no waiter misses a freed permit (a lost wake-up would
/// leave a waiter to time out after `max_wait` and fail its call).
#[test]
fn under_contention_never_more_than_max_concurrent_and_no_waiter_is_forgotten() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{ServiceExt, service_fn};

    for seed in 0..5 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_time()
            .build()
            .unwrap();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let layer = BulkheadLayer::builder()
            .max_concurrent(3)
            .max_waiting(64)
            .max_wait(Duration::from_secs(30))
            .build()
            .unwrap();
        let svc = layer.layer(service_fn({
            let (in_flight, peak) = (in_flight.clone(), peak.clone());
            move |x: u32| {
                let (in_flight, peak) = (in_flight.clone(), peak.clone());
                async move {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    for _ in 0..(x % 4) {
                        tokio::task::yield_now().await;
                    }
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, std::convert::Infallible>(x)
                }
            }
        }));
        let failures = rt.block_on(async {
            let tasks: Vec<_> = (0..48u32)
                .map(|t| {
                    let svc = svc.clone();
                    tokio::spawn(async move {
                        let mut failed = 0;
                        for i in 0..50u32 {
                            if svc.clone().oneshot(t * 50 + i + seed).await.is_err() {
                                failed += 1;
                            }
                        }
                        failed
                    })
                })
                .collect();
            let mut failed = 0;
            for t in tasks {
                failed += t.await.unwrap();
            }
            failed
        });
        assert!(
            peak.load(Ordering::SeqCst) <= 3,
            "peak {}",
            peak.load(Ordering::SeqCst)
        );
        assert_eq!(
            failures, 0,
            "seed {seed}: waiters were rejected although permits freed"
        );
        assert_eq!(layer.available_permits(), 3);
    }
}

// --- one bulkhead per key -------------------------------------------------------

type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, BoxError>> + Send>>;

/// A service that answers `(key, n)` with `n` after `n` ms, counting the calls made.
fn keyed_service(
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> impl tower::Service<(&'static str, u64), Response = u64, Error = BoxError, Future = Answer> + Clone
{
    tower::service_fn(move |(_, ms): (&'static str, u64)| {
        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(ms)
        }) as Answer
    })
}

/// Each key has its own permits: one key's bulkhead full (a slow dependency) rejects
/// that key's next call, while another key's calls go through; its permits come back
/// when its calls end, or when their futures are dropped.
#[tokio::test(start_paused = true)]
async fn a_full_key_rejects_its_calls_while_another_key_is_admitted() {
    use tower::ServiceExt;
    let layer = BulkheadLayer::builder()
        .max_concurrent(2)
        .keyed(|req: &(&'static str, u64)| req.0)
        .unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = layer.layer(keyed_service(calls.clone()));
    let slow1 = tokio::spawn(svc.clone().oneshot(("slow", 10_000)));
    let slow2 = tokio::spawn(svc.clone().oneshot(("slow", 10_000)));
    time::sleep(Duration::from_millis(1)).await;
    assert_eq!(layer.available_permits(&"slow"), 0);
    let err = svc.clone().oneshot(("slow", 1)).await.unwrap_err();
    assert!(is_full(&err), "{err}");
    for _ in 0..5 {
        assert_eq!(svc.clone().oneshot(("fast", 1)).await.unwrap(), 1);
    }
    assert_eq!(layer.available_permits(&"fast"), 2);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 7);
    slow1.abort();
    assert!(slow1.await.unwrap_err().is_cancelled());
    assert_eq!(
        layer.available_permits(&"slow"),
        1,
        "a dropped call frees its permit"
    );
    assert_eq!(svc.clone().oneshot(("slow", 1)).await.unwrap(), 1);
    slow2.abort();
}

/// With waiting allowed, a call for a full key waits for that key's permit (up to
/// `max_wait`), and is admitted when one of its key's calls ends.
#[tokio::test(start_paused = true)]
async fn a_call_for_a_full_key_waits_for_its_keys_permit() {
    use tower::ServiceExt;
    let layer = BulkheadLayer::builder()
        .max_concurrent(1)
        .max_waiting(1)
        .max_wait(Duration::from_millis(500))
        .keyed(|req: &(&'static str, u64)| req.0)
        .unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = layer.layer(keyed_service(calls));
    let start = time::Instant::now();
    let first = tokio::spawn(svc.clone().oneshot(("a", 300)));
    time::sleep(Duration::from_millis(1)).await;
    assert_eq!(svc.clone().oneshot(("a", 10)).await.unwrap(), 10);
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(310),
        "admitted when the first ended"
    );
    assert_eq!(first.await.unwrap().unwrap(), 300);
    // Waiting past `max_wait` is a rejection after the wait.
    let long = tokio::spawn(svc.clone().oneshot(("a", 10_000)));
    time::sleep(Duration::from_millis(1)).await;
    let err = svc.clone().oneshot(("a", 1)).await.unwrap_err();
    let full = find_cause::<Full>(&*err).unwrap();
    assert_eq!(full.waited(), Some(Duration::from_millis(500)));
    long.abort();
}

/// A key's bulkhead with no call in flight is the same as a new one, so the layer
/// keeps only the keys in use: calls to ever new keys (hosts taken from requests) do
/// not grow it without bound.
#[tokio::test(start_paused = true)]
async fn keys_without_calls_are_swept_so_the_keys_are_bounded_by_the_calls_in_flight() {
    use tower::ServiceExt;
    let layer = BulkheadLayer::builder()
        .max_concurrent(1)
        .keyed(|req: &String| req.clone())
        .unwrap();
    let svc = layer.layer(tower::service_fn(|key: String| async move {
        if key == "held" {
            std::future::pending::<()>().await;
        }
        Ok::<_, BoxError>(key)
    }));
    // A key in use is never swept: its call holds its permit throughout.
    let held = tokio::spawn(svc.clone().oneshot("held".to_owned()));
    time::sleep(Duration::from_millis(1)).await;
    for i in 0..10_000u64 {
        let key = format!("host-{i}");
        assert_eq!(svc.clone().oneshot(key.clone()).await.unwrap(), key);
    }
    assert!(layer.keys() <= 64, "{} keys kept", layer.keys());
    assert_eq!(layer.available_permits(&"held".to_owned()), 0);
    let err = svc.clone().oneshot("held".to_owned()).await.unwrap_err();
    assert!(is_full(&err), "{err}");
    held.abort();
}

/// Backpressure needs the key in `poll_ready`, which a keyed bulkhead does not have:
/// asked for, it is a configuration error, not an unbounded pile of waiting futures.
#[test]
fn a_keyed_bulkhead_refuses_backpressure() {
    let Err(err) = BulkheadLayer::builder()
        .backpressure()
        .keyed::<u32, _>(|req: &u32| *req)
    else {
        panic!("a keyed bulkhead with backpressure was built");
    };
    assert_eq!(err.field(), "bulkhead.max_waiting");
}

/// Any number of waiters, each for a bounded time, is no backpressure: a keyed
/// bulkhead takes it as the plain one does, and a call for a full key is rejected
/// after its `max_wait`.
#[tokio::test(start_paused = true)]
async fn a_keyed_bulkhead_takes_any_number_of_waiters_with_a_bounded_wait() {
    use tower::ServiceExt;
    let layer = BulkheadLayer::builder()
        .max_concurrent(1)
        .max_waiting(usize::MAX)
        .max_wait(Duration::from_millis(50))
        .keyed(|req: &(&'static str, u64)| req.0)
        .expect("a bounded wait is no backpressure");
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = layer.layer(keyed_service(calls));
    let held = tokio::spawn(svc.clone().oneshot(("a", 10_000)));
    time::sleep(Duration::from_millis(1)).await;
    let err = svc.clone().oneshot(("a", 1)).await.unwrap_err();
    let full = find_cause::<Full>(&*err).unwrap();
    assert_eq!(full.waited(), Some(Duration::from_millis(50)));
    held.abort();
}

/// A call its full key rejects was made ready first; what that readiness reserved
/// inside (here a permit of a bulkhead all keys share) goes back at once, not when the
/// caller next uses the service (a retry keeps it through its backoff).
#[tokio::test(start_paused = true)]
async fn a_call_a_full_key_rejects_gives_back_what_readiness_reserved_inside() {
    use tower::{Service, ServiceExt};
    let shared = BulkheadLayer::new(2).unwrap();
    let keyed = BulkheadLayer::builder()
        .max_concurrent(1)
        .keyed(|req: &(&'static str, u64)| req.0)
        .unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = keyed.layer(shared.layer(keyed_service(calls)));
    let held = tokio::spawn(svc.clone().oneshot(("a", 10_000)));
    time::sleep(Duration::from_millis(1)).await;
    assert_eq!(shared.available_permits(), 1);
    let mut kept = svc.clone();
    let err = kept
        .ready()
        .await
        .unwrap()
        .call(("a", 1))
        .await
        .unwrap_err();
    assert!(is_full(&err), "{err}");
    assert_eq!(
        shared.available_permits(),
        1,
        "a permit is parked in `kept`"
    );
    held.abort();
}

/// A call that waits for its key's permit holds nothing of the service inside while
/// it waits: it readies a clone of its own once it has the permit. (Moved into the
/// wait ready, it held a permit of a bulkhead all keys share for up to `max_wait`, and
/// a key with calls waiting took the other keys' room.)
#[tokio::test(start_paused = true)]
async fn a_call_waiting_for_its_keys_permit_holds_nothing_inside() {
    use tower::ServiceExt;
    let shared = BulkheadLayer::new(2).unwrap();
    let keyed = BulkheadLayer::builder()
        .max_concurrent(1)
        .max_waiting(1)
        .max_wait(Duration::from_secs(1))
        .keyed(|req: &(&'static str, u64)| req.0)
        .unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = keyed.layer(shared.layer(keyed_service(calls)));
    let held = tokio::spawn(svc.clone().oneshot(("a", 10_000)));
    time::sleep(Duration::from_millis(1)).await;
    let waiting = tokio::spawn(svc.clone().oneshot(("a", 1)));
    time::sleep(Duration::from_millis(1)).await;
    assert!(!waiting.is_finished());
    assert_eq!(
        shared.available_permits(),
        1,
        "the waiting call holds a permit"
    );
    assert_eq!(svc.clone().oneshot(("b", 1)).await.unwrap(), 1);
    held.abort();
    assert_eq!(waiting.await.unwrap().unwrap(), 1);
}

/// A service whose readiness failed does not keep its permit: another caller is
/// admitted while the failed one is still held (a balancer may drop it late). Before,
/// the permit stayed taken until the failed service was dropped.
#[tokio::test(start_paused = true)]
async fn a_service_that_failed_readiness_gives_its_permit_back() {
    let layer = BulkheadLayer::new(1).unwrap();
    let (mut c, mut handle) = callers(&layer, 2);
    handle.send_error("connection pool closed");
    assert_ready_err!(c[0].poll_ready());
    assert_ready_ok!(c[1].poll_ready());
    let mut f1 = tokio_test::task::spawn(c[1].call(1));
    assert_pending!(f1.poll(), "admitted: waiting for its answer");
    let (req, send) = handle
        .next_request()
        .await
        .expect("the call reached the service");
    assert_eq!(req, 1);
    send.send_response(2);
    assert_eq!(assert_ready_ok!(f1.poll()), 2);
}
