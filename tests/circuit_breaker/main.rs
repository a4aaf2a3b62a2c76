//! Behaviour of the circuit breaker through its tower shell.

use postbox::BoxError;
use postbox::bulkhead::error::Full;
use postbox::circuit_breaker::error::Open;
use postbox::circuit_breaker::{
    CircuitBreakerBuilder, CircuitBreakerHandle, CircuitBreakerLayer, State, Transition,
};
use postbox::classify::Classification;
use postbox::error::{find_cause, is_caused_by};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::advance;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_test::mock;

/// What the test service should do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Do {
    Succeed,
    Fail,
    /// Fail with one of our own rejections (ignored by the breaker).
    RejectOpen,
    RejectFull,
    /// Succeed after this long (paused time).
    SucceedAfter(Duration),
}

type Svc = tower::util::BoxService<Do, (), BoxError>;

/// A breaker over a service that does what each request says; counts inner calls.
fn breaker(builder: CircuitBreakerBuilder) -> (Svc, CircuitBreakerHandle, Arc<AtomicUsize>) {
    let layer = builder.build().expect("valid config");
    let handle = layer.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let inner = service_fn(move |req: Do| {
        c.fetch_add(1, SeqCst);
        async move {
            match req {
                Do::Succeed => Ok(()),
                Do::Fail => Err(BoxError::from(io::Error::from(
                    io::ErrorKind::ConnectionReset,
                ))),
                Do::RejectOpen => Err(Open::new(Duration::from_secs(1)).into()),
                Do::RejectFull => Err(Full::new(1, 0).into()),
                Do::SucceedAfter(d) => {
                    tokio::time::sleep(d).await;
                    Ok(())
                }
            }
        }
    });
    (
        Svc::new(layer.layer(inner).map_err(BoxError::from)),
        handle,
        calls,
    )
}

async fn run(svc: &mut Svc, req: Do) -> Result<(), BoxError> {
    svc.ready().await?.call(req).await
}

async fn run_n(svc: &mut Svc, req: Do, n: usize) {
    for _ in 0..n {
        let _ = run(svc, req).await;
    }
}

fn open_error<E: Into<BoxError>>(r: Result<(), E>) -> Open {
    let Err(e) = r else {
        panic!("expected a rejection")
    };
    let e: BoxError = e.into();
    find_cause::<Open>(&*e).expect("an Open error").clone()
}

// --- count window ---------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn after_n_successes_n_half_failures_open_it() {
    let (mut svc, h, _) = breaker(
        CircuitBreakerLayer::builder()
            .count_window(10)
            .minimum_calls(10),
    );
    run_n(&mut svc, Do::Succeed, 10).await;
    run_n(&mut svc, Do::Fail, 4).await;
    assert_eq!(h.state(), State::Closed);
    assert_eq!(h.metrics().failure_rate(), Some(0.4));
    run_n(&mut svc, Do::Fail, 1).await;
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn window_of_size_one_follows_the_last_call() {
    let (mut svc, h, _) = breaker(
        CircuitBreakerLayer::builder()
            .count_window(1)
            .minimum_calls(1)
            .failure_rate_threshold(1.0),
    );
    run_n(&mut svc, Do::Succeed, 5).await;
    assert_eq!(h.metrics().calls(), 1);
    run(&mut svc, Do::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn minimum_calls_larger_than_the_window_is_capped_at_its_size() {
    let (mut svc, h, _) = breaker(
        CircuitBreakerLayer::builder()
            .count_window(4)
            .minimum_calls(1000),
    );
    run_n(&mut svc, Do::Fail, 3).await;
    assert_eq!(h.state(), State::Closed);
    run_n(&mut svc, Do::Fail, 1).await;
    assert_eq!(h.state(), State::Open, "a full window of 4 is enough");
}

#[tokio::test(start_paused = true)]
async fn failures_slide_out_of_the_count_window() {
    let (mut svc, h, _) = breaker(
        CircuitBreakerLayer::builder()
            .count_window(4)
            .minimum_calls(4),
    );
    run_n(&mut svc, Do::Fail, 1).await;
    run_n(&mut svc, Do::Succeed, 4).await;
    assert_eq!(h.metrics().failures(), 0);
    run_n(&mut svc, Do::Fail, 1).await;
    assert_eq!(h.state(), State::Closed);
}

// --- time window -------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn time_window_bucket_expires_exactly_at_t() {
    let (mut svc, h, _) = breaker(
        CircuitBreakerLayer::builder()
            .time_window(Duration::from_secs(10), 10)
            .minimum_calls(2),
    );
    run(&mut svc, Do::Fail).await.unwrap_err();
    advance(Duration::from_secs(10) - Duration::from_nanos(1)).await;
    assert_eq!(h.metrics().calls(), 1);
    advance(Duration::from_nanos(1)).await;
    assert_eq!(h.metrics().calls(), 0, "gone exactly at T");
    run(&mut svc, Do::Fail).await.unwrap_err();
    assert_eq!(
        h.state(),
        State::Closed,
        "the first failure no longer counts"
    );
    run(&mut svc, Do::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Open);
}

/// Calls leaving a time window can bring it back below the minimum; the successes
/// that then bring it up to the minimum again are evaluated, so the failures still
/// inside trip it at the minimum, as resilience4j does (it waited for the next
/// failure).
#[tokio::test(start_paused = true)]
async fn a_success_reaching_the_minimum_after_calls_expired_trips_the_window() {
    let (mut svc, h, _) = breaker(
        CircuitBreakerLayer::builder()
            .time_window(Duration::from_secs(10), 10)
            .minimum_calls(10)
            .failure_rate_threshold(0.5),
    );
    run_n(&mut svc, Do::Succeed, 8).await;
    advance(Duration::from_millis(9500)).await;
    run_n(&mut svc, Do::Fail, 5).await;
    assert_eq!(h.state(), State::Closed, "5 of 13 failed");
    // The 8 successes leave the window at 10 s: 5 calls, all failures, below the minimum
    // (seen first by a metrics read, whose rotation the next outcome does not see).
    advance(Duration::from_millis(700)).await;
    assert_eq!(h.metrics().calls(), 5);
    run_n(&mut svc, Do::Succeed, 4).await;
    assert_eq!(h.state(), State::Closed, "9 calls: below the minimum");
    run_n(&mut svc, Do::Succeed, 1).await;
    assert_eq!(h.state(), State::Open, "5 of 10 failed");
}

/// Calls leaving a time window can raise its failure rate past the threshold while it
/// stays above the minimum. Seen first by a metrics read (a scrape), whose rotation
/// the next outcome does not see, the next success still trips it, as it would have
/// without the read (and as resilience4j does: it evaluates every call).
#[tokio::test(start_paused = true)]
async fn a_success_after_a_metrics_read_expired_calls_trips_the_window() {
    let (mut svc, h, _) = breaker(
        CircuitBreakerLayer::builder()
            .time_window(Duration::from_secs(10), 10)
            .minimum_calls(10)
            .failure_rate_threshold(0.6),
    );
    run_n(&mut svc, Do::Succeed, 10).await;
    advance(Duration::from_millis(9500)).await;
    run_n(&mut svc, Do::Fail, 10).await;
    assert_eq!(h.state(), State::Closed, "10 of 20 failed");
    // The 10 successes leave the window at 10 s: 10 calls, all failures.
    advance(Duration::from_millis(600)).await;
    assert_eq!(h.metrics().failure_rate(), Some(1.0));
    run_n(&mut svc, Do::Succeed, 1).await;
    assert_eq!(h.state(), State::Open, "10 of 11 failed");
}

#[tokio::test(start_paused = true)]
async fn time_window_of_one_bucket() {
    let (mut svc, h, _) = breaker(
        CircuitBreakerLayer::builder()
            .time_window(Duration::from_secs(1), 1)
            .minimum_calls(3),
    );
    run_n(&mut svc, Do::Fail, 2).await;
    advance(Duration::from_secs(1)).await;
    run_n(&mut svc, Do::Fail, 2).await;
    assert_eq!(h.state(), State::Closed);
    run_n(&mut svc, Do::Fail, 1).await;
    assert_eq!(h.state(), State::Open);
}

// --- slow calls --------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_the_breaker() {
    let (mut svc, h, _) = breaker(
        CircuitBreakerLayer::builder()
            .count_window(4)
            .minimum_calls(4)
            .slow_calls(Duration::from_millis(100), 0.5),
    );
    run_n(&mut svc, Do::SucceedAfter(Duration::from_millis(100)), 4).await;
    assert_eq!(
        h.metrics().slow_calls(),
        0,
        "exactly the threshold is not slow"
    );
    run_n(&mut svc, Do::SucceedAfter(Duration::from_millis(101)), 1).await;
    assert_eq!(h.state(), State::Closed);
    run_n(&mut svc, Do::SucceedAfter(Duration::from_millis(101)), 1).await;
    assert_eq!(h.state(), State::Open);
}

/// A call's time is counted from `call`, not from `poll_ready`: time the inner service
/// spends not ready (a bulkhead's queue inside the breaker) is local queueing, and
/// counting it made every call of a burst slow and tripped the breaker.
#[tokio::test(start_paused = true)]
async fn slow_call_time_excludes_waiting_for_the_inner_service_to_be_ready() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(1)
        .minimum_calls(1)
        .slow_calls(Duration::from_secs(1), 0.5)
        .build()
        .unwrap();
    let h = layer.handle();
    let (inner, mut handle) = mock::pair::<(), ()>();
    let mut svc = mock::Spawn::new(layer.layer(inner));
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    advance(Duration::from_secs(2)).await; // queued behind a full bulkhead
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(());
    let ((), reply) = handle.next_request().await.unwrap();
    reply.send_response(()); // answered at once
    fut.await.unwrap();
    assert_eq!(h.metrics().slow_calls(), 0);
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_are_not_tracked_unless_configured() {
    let (mut svc, h, _) = breaker(
        CircuitBreakerLayer::builder()
            .count_window(2)
            .minimum_calls(1),
    );
    run_n(&mut svc, Do::SucceedAfter(Duration::from_secs(3600)), 4).await;
    assert_eq!(h.metrics().slow_calls(), 0);
    assert_eq!(h.state(), State::Closed);
}

// --- what counts -------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn own_rejections_are_not_counted() {
    let (mut svc, h, _) = breaker(
        CircuitBreakerLayer::builder()
            .count_window(2)
            .minimum_calls(1),
    );
    run_n(&mut svc, Do::RejectOpen, 10).await;
    run_n(&mut svc, Do::RejectFull, 10).await;
    assert_eq!(h.metrics().calls(), 0);
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn rejections_of_an_open_breaker_are_not_counted() {
    let (mut svc, h, calls) = breaker(
        CircuitBreakerLayer::builder()
            .count_window(2)
            .minimum_calls(1)
            .break_duration(Duration::from_secs(5)),
    );
    run(&mut svc, Do::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Open);
    for _ in 0..5 {
        let open = open_error(run(&mut svc, Do::Succeed).await);
        assert_eq!(open.retry_after(), Duration::from_secs(5));
    }
    assert_eq!(
        calls.load(SeqCst),
        1,
        "rejected calls never reach the inner service"
    );
    let m = h.metrics();
    assert_eq!((m.calls(), m.not_permitted()), (1, 5));
}

#[tokio::test(start_paused = true)]
async fn overload_counts_as_failure() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(2)
        .minimum_calls(2)
        .build()
        .unwrap()
        .with_classifier(|out: Result<&u16, &BoxError>| match out {
            Ok(429) => Classification::overload(None),
            Ok(_) => Classification::success(),
            Err(_) => Classification::failure(),
        });
    let h = layer.handle();
    let mut svc = layer.layer(service_fn(|s: u16| async move { Ok::<_, BoxError>(s) }));
    svc.ready().await.unwrap().call(429).await.unwrap();
    svc.ready().await.unwrap().call(429).await.unwrap();
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn retry_after_counts_down() {
    let (mut svc, _h, _) = breaker(
        CircuitBreakerLayer::builder()
            .consecutive_failures(1)
            .break_duration(Duration::from_secs(10)),
    );
    run(&mut svc, Do::Fail).await.unwrap_err();
    advance(Duration::from_secs(3)).await;
    assert_eq!(
        open_error(run(&mut svc, Do::Succeed).await).retry_after(),
        Duration::from_secs(7)
    );
}

// --- half-open ---------------------------------------------------------------------

type MockSvc =
    tower_test::mock::Spawn<postbox::circuit_breaker::CircuitBreaker<mock::Mock<(), ()>>>;

fn tripped_mock(probes: u32) -> (MockSvc, mock::Handle<(), ()>, CircuitBreakerHandle) {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .failure_rate_threshold(0.5)
        .permitted_probes(probes)
        .break_duration(Duration::from_secs(1))
        .build()
        .unwrap();
    let h = layer.handle();
    let (svc, handle) = mock::spawn_layer(layer);
    (svc, handle, h)
}

/// A breaker that opens on one failure, around a mock; with its handle.
fn one_failure_mock() -> (MockSvc, mock::Handle<(), ()>, CircuitBreakerHandle) {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .build()
        .unwrap();
    let breaker = layer.handle();
    let (svc, handle) = mock::spawn_layer(layer);
    (svc, handle, breaker)
}

/// Trips the breaker with one failed call and waits out the break.
async fn trip_and_wait(
    svc: &mut MockSvc,
    handle: &mut mock::Handle<(), ()>,
    h: &CircuitBreakerHandle,
) {
    trip(svc, handle, h).await;
    advance(Duration::from_secs(1)).await;
}

/// Trips the breaker with one failed call.
async fn trip(svc: &mut MockSvc, handle: &mut mock::Handle<(), ()>, h: &CircuitBreakerHandle) {
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("boom");
    fut.await.unwrap_err();
    assert_eq!(h.state(), State::Open);
}

/// The documented defaults, as behaviour: a count window judged from 20 calls,
/// tripping at 50 % failures; a 5 s break; then 3 probes at once. (resilience4j's
/// docs and code once disagreed on a default; these pin ours.)
#[tokio::test(start_paused = true)]
async fn the_default_breaker_trips_at_half_of_20_calls_and_admits_3_probes_after_5s() {
    let (mut svc, h, calls) = breaker(CircuitBreakerLayer::builder());
    run_n(&mut svc, Do::Succeed, 10).await;
    run_n(&mut svc, Do::Fail, 9).await;
    assert_eq!(h.state(), State::Closed, "19 calls are below the minimum");
    run_n(&mut svc, Do::Fail, 1).await;
    assert_eq!(h.state(), State::Open, "10 failures of 20 calls");
    let open = open_error(run(&mut svc, Do::Succeed).await);
    assert_eq!(open.retry_after(), Duration::from_secs(5));
    advance(Duration::from_millis(4999)).await;
    open_error(run(&mut svc, Do::Succeed).await);
    assert_eq!(calls.load(SeqCst), 20);
    advance(Duration::from_millis(1)).await;
    // Three probes are let through together; a fourth caller is turned away.
    let mut probes = Vec::new();
    for _ in 0..3 {
        let ready = svc.ready().await.unwrap();
        probes.push(ready.call(Do::SucceedAfter(Duration::from_secs(1))));
    }
    assert_eq!(h.state(), State::HalfOpen);
    open_error(run(&mut svc, Do::Succeed).await);
    for p in probes {
        p.await.unwrap();
    }
    assert_eq!(calls.load(SeqCst), 23);
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_configured_probes() {
    let (mut svc, mut handle, h) = tripped_mock(2);
    trip_and_wait(&mut svc, &mut handle, &h).await;
    handle.allow(10);
    assert_ready_ok!(svc.poll_ready());
    let p1 = svc.call(());
    assert_eq!(h.state(), State::HalfOpen);
    assert_ready_ok!(svc.poll_ready());
    let p2 = svc.call(());
    assert_ready_ok!(svc.poll_ready());
    let third = open_error(svc.call(()).await);
    assert_eq!(third.retry_after(), Duration::ZERO);
    for _ in 0..2 {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(());
    }
    p1.await.unwrap();
    p2.await.unwrap();
    assert_eq!(h.state(), State::Closed);
}

/// Half-open is judged once min(`minimum_calls`, `permitted_probes`) probes are done,
/// as resilience4j does: with `minimum_calls(1)` the first probe's success closes the
/// breaker while two more are still out (their results are dropped), and a first
/// failed probe reopens it.
#[tokio::test(start_paused = true)]
async fn half_open_is_judged_after_min_of_minimum_calls_and_probes() {
    for (first, then) in [(true, State::Closed), (false, State::Open)] {
        let layer = CircuitBreakerLayer::builder()
            .count_window(4)
            .minimum_calls(1)
            .failure_rate_threshold(0.5)
            .permitted_probes(3)
            .break_duration(Duration::from_secs(1))
            .build()
            .unwrap();
        let h = layer.handle();
        let (mut svc, mut handle) = mock::spawn_layer(layer);
        trip_and_wait(&mut svc, &mut handle, &h).await;
        handle.allow(3);
        let mut probes = Vec::new();
        for _ in 0..3 {
            assert_ready_ok!(svc.poll_ready());
            probes.push(svc.call(()));
        }
        assert_eq!(h.state(), State::HalfOpen);
        let (_, send) = handle.next_request().await.unwrap();
        if first {
            send.send_response(());
        } else {
            send.send_error("still down");
        }
        let p1 = probes.remove(0);
        assert_eq!(p1.await.is_ok(), first);
        assert_eq!(h.state(), then);
        // The other two probes' results come from the old state: dropped.
        for _ in 0..2 {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_error("late");
        }
        for p in probes {
            p.await.unwrap_err();
        }
        assert_eq!(h.state(), then);
    }
}

/// In half-open the metrics show the probes, not the window that tripped: the probes
/// done so far, and no rate until as many are done as the decision waits for.
#[tokio::test(start_paused = true)]
async fn half_open_metrics_show_the_probes() {
    let (mut svc, mut handle, h) = tripped_mock(2);
    trip_and_wait(&mut svc, &mut handle, &h).await;
    assert_eq!(
        h.metrics().consecutive_failures(),
        1,
        "open: what tripped it"
    );
    handle.allow(2);
    let mut probes = Vec::new();
    for _ in 0..2 {
        assert_ready_ok!(svc.poll_ready());
        probes.push(svc.call(()));
    }
    let m = h.metrics();
    assert_eq!(m.state(), State::HalfOpen);
    assert_eq!(
        (m.calls(), m.failures(), m.consecutive_failures()),
        (0, 0, 0)
    );
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("still down");
    probes.remove(0).await.unwrap_err();
    let m = h.metrics();
    assert_eq!((m.calls(), m.failures()), (1, 1));
    assert_eq!(
        m.failure_rate(),
        None,
        "one of the two probes the decision waits for"
    );
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(());
    probes.remove(0).await.unwrap();
    // 1 of 2 failed: 50% reopens.
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn failing_probes_reopen_with_a_fresh_break() {
    let (mut svc, mut handle, h) = tripped_mock(1);
    trip_and_wait(&mut svc, &mut handle, &h).await;
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let p = svc.call(());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("still down");
    p.await.unwrap_err();
    assert_eq!(h.state(), State::Open);
    assert_eq!(h.retry_after(), Some(Duration::from_secs(1)));
}

#[tokio::test(start_paused = true)]
async fn dropped_probe_releases_slot() {
    let (mut svc, mut handle, h) = tripped_mock(1);
    trip_and_wait(&mut svc, &mut handle, &h).await;
    handle.allow(10);
    assert_ready_ok!(svc.poll_ready());
    let p = svc.call(());
    assert_ready_ok!(svc.poll_ready());
    assert!(svc.call(()).await.is_err(), "the only slot is taken");
    drop(p);
    assert_ready_ok!(svc.poll_ready());
    let p = svc.call(());
    let _first = handle.next_request().await.unwrap();
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(());
    p.await.unwrap();
    assert_eq!(h.state(), State::Closed);
}

/// With `count_dropped`, a call its caller gave up on (a timeout outside the breaker)
/// is a failure: a dependency that hangs trips the breaker. Without it (the default),
/// such calls record nothing and the breaker stays closed.
#[tokio::test(start_paused = true)]
async fn a_dropped_call_is_a_failure_only_with_count_dropped() {
    for count_dropped in [false, true] {
        let layer = CircuitBreakerLayer::builder()
            .consecutive_failures(2)
            .permitted_probes(1)
            .break_duration(Duration::from_secs(1))
            .count_dropped(count_dropped)
            .build()
            .unwrap();
        let h = layer.handle();
        let hung = service_fn(|()| std::future::pending::<Result<(), BoxError>>());
        let mut svc = layer.layer(hung);
        for _ in 0..2 {
            let call = svc.ready().await.unwrap().call(());
            tokio::time::timeout(Duration::from_millis(100), call)
                .await
                .unwrap_err();
        }
        if !count_dropped {
            assert_eq!(h.state(), State::Closed);
            continue;
        }
        assert_eq!(h.state(), State::Open);
        // A probe dropped unfinished is a failed probe: the breaker opens again.
        advance(Duration::from_secs(1)).await;
        let probe = svc.ready().await.unwrap().call(());
        assert_eq!(h.state(), State::HalfOpen);
        drop(probe);
        assert_eq!(h.state(), State::Open);
    }
}

#[tokio::test(start_paused = true)]
async fn probe_reserved_by_a_dropped_service_is_released() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .permitted_probes(1)
        .break_duration(Duration::from_secs(1))
        .build()
        .unwrap();
    let h = layer.handle();
    let inner = service_fn(|ok: bool| async move {
        if ok {
            Ok(())
        } else {
            Err(BoxError::from("down"))
        }
    });
    let mut first = layer.layer(inner);
    let mut second = first.clone();
    first.ready().await.unwrap().call(false).await.unwrap_err();
    advance(Duration::from_secs(1)).await;
    first.ready().await.unwrap(); // reserves the only probe slot...
    assert_eq!(h.state(), State::HalfOpen);
    drop(first); // ...and gives it back
    second.ready().await.unwrap().call(true).await.unwrap();
    assert_eq!(h.state(), State::Closed);
}

/// A service whose future panics when polled.
#[derive(Clone)]
struct Panics;

impl Service<()> for Panics {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        Box::pin(async { panic!("probe panicked") })
    }
}

#[tokio::test(start_paused = true)]
async fn panicking_probe_releases_slot() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .permitted_probes(1)
        .break_duration(Duration::from_secs(1))
        .build()
        .unwrap();
    let h = layer.handle();
    let mut failing = layer.layer(service_fn(|_: ()| async {
        Err::<(), _>(BoxError::from("boom"))
    }));
    failing.ready().await.unwrap().call(()).await.unwrap_err();
    advance(Duration::from_secs(1)).await;

    let mut panics = layer.layer(Panics);
    let fut = panics.ready().await.unwrap().call(());
    assert_eq!(h.state(), State::HalfOpen);
    let joined = tokio::spawn(fut).await;
    assert!(joined.unwrap_err().is_panic());

    let mut ok = layer.layer(service_fn(|_: ()| async { Ok::<_, BoxError>(()) }));
    ok.ready()
        .await
        .unwrap()
        .call(())
        .await
        .expect("the slot came back");
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn ignored_probe_outcome_releases_slot() {
    let (mut svc, h, _) = breaker(
        CircuitBreakerLayer::builder()
            .consecutive_failures(1)
            .permitted_probes(1)
            .break_duration(Duration::from_secs(1)),
    );
    run(&mut svc, Do::Fail).await.unwrap_err();
    advance(Duration::from_secs(1)).await;
    run(&mut svc, Do::RejectFull).await.unwrap_err();
    assert_eq!(h.state(), State::HalfOpen);
    run(&mut svc, Do::Succeed).await.unwrap();
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn max_wait_in_half_open_reopens_a_stuck_breaker() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .permitted_probes(1)
        .break_duration(Duration::from_secs(1))
        .max_wait_in_half_open(Duration::from_secs(30))
        .build()
        .unwrap();
    let h = layer.handle();
    let (mut svc, mut handle) = mock::spawn_layer::<(), (), _>(layer);
    handle.allow(10);
    assert_ready_ok!(svc.poll_ready());
    let f = svc.call(());
    handle.next_request().await.unwrap().1.send_error("boom");
    f.await.unwrap_err();
    advance(Duration::from_secs(1)).await;
    assert_ready_ok!(svc.poll_ready());
    let _stuck = svc.call(()); // the probe never answers
    advance(Duration::from_secs(30)).await;
    assert_ready_ok!(svc.poll_ready());
    let e = open_error(svc.call(()).await);
    assert_eq!(h.state(), State::Open);
    assert_eq!(e.retry_after(), Duration::from_secs(1));
}

/// By default a half-open breaker whose probe never answers (no timeout inside the
/// breaker) re-opens after 60 s instead of rejecting every call for good. (The max
/// wait was off by default.)
#[tokio::test(start_paused = true)]
async fn by_default_a_stuck_half_open_breaker_reopens_after_a_minute() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .permitted_probes(1)
        .break_duration(Duration::from_secs(1))
        .build()
        .unwrap();
    let h = layer.handle();
    let (mut svc, mut handle) = mock::spawn_layer::<(), (), _>(layer);
    handle.allow(10);
    assert_ready_ok!(svc.poll_ready());
    let f = svc.call(());
    handle.next_request().await.unwrap().1.send_error("boom");
    f.await.unwrap_err();
    advance(Duration::from_secs(1)).await;
    assert_ready_ok!(svc.poll_ready());
    let _stuck = svc.call(()); // the probe never answers
    advance(Duration::from_secs(59)).await;
    assert_ready_ok!(svc.poll_ready());
    open_error(svc.call(()).await);
    assert_eq!(h.state(), State::HalfOpen);
    advance(Duration::from_secs(1)).await;
    assert_ready_ok!(svc.poll_ready());
    open_error(svc.call(()).await);
    assert_eq!(h.state(), State::Open);
}

// --- manual control -------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn forced_states() {
    let (mut svc, h, calls) = breaker(
        CircuitBreakerLayer::builder()
            .count_window(2)
            .minimum_calls(1),
    );

    h.force_open();
    assert_eq!(h.state(), State::ForcedOpen);
    advance(Duration::from_secs(3600)).await;
    assert!(is_caused_by::<Open>(
        &*run(&mut svc, Do::Succeed).await.unwrap_err()
    ));
    assert_eq!(calls.load(SeqCst), 0);

    h.disable();
    run_n(&mut svc, Do::Fail, 10).await;
    assert_eq!(h.state(), State::Disabled);
    assert_eq!(h.metrics().calls(), 0, "disabled records nothing");

    h.metrics_only();
    run_n(&mut svc, Do::Fail, 10).await;
    assert_eq!(h.state(), State::MetricsOnly);
    assert_eq!(h.metrics().failures(), 2, "metrics-only records");

    h.force_closed();
    assert_eq!(h.metrics().calls(), 0);
    run(&mut svc, Do::Fail).await.unwrap_err();
    assert_eq!(h.state(), State::Open, "force_closed trips again as usual");

    h.reset();
    let m = h.metrics();
    assert_eq!(
        (m.state(), m.calls(), m.not_permitted()),
        (State::Closed, 0, 0)
    );
}

// --- transitions ----------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn late_result_does_not_fire_a_second_transition() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let layer = CircuitBreakerLayer::builder()
        .name("payments")
        .consecutive_failures(1)
        .permitted_probes(1)
        .on_transition(move |t: &Transition| {
            s.lock().unwrap().push((t.from(), t.to(), t.generation()))
        })
        .build()
        .unwrap();
    let (mut svc, mut handle) = mock::spawn_layer::<(), (), _>(layer);
    handle.allow(10);
    assert_ready_ok!(svc.poll_ready());
    let early = svc.call(());
    assert_ready_ok!(svc.poll_ready());
    let late = svc.call(());
    let (_, a) = handle.next_request().await.unwrap();
    let (_, b) = handle.next_request().await.unwrap();
    a.send_error("first");
    early.await.unwrap_err();
    // The break ends and a probe closes the breaker: the late failure lands in a
    // closed breaker, which it would trip if it were counted.
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_ready_ok!(svc.poll_ready());
    let probe = svc.call(());
    let (_, p) = handle.next_request().await.unwrap();
    p.send_response(());
    probe.await.unwrap();
    assert_eq!(layer_state(&seen), State::Closed);
    b.send_error("second, admitted before the trip");
    late.await.unwrap_err();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[0], (State::Closed, State::Open, 1));
    assert_eq!(seen[2].1, State::Closed, "{seen:?}");
}

/// The state the last transition seen went to.
fn layer_state(seen: &Mutex<Vec<(State, State, u64)>>) -> State {
    seen.lock().unwrap().last().map_or(State::Closed, |t| t.1)
}

#[tokio::test(start_paused = true)]
async fn rejected_call_does_not_poll_inner_readiness() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .build()
        .unwrap();
    layer.handle().force_open();
    let (mut svc, mut handle) = mock::spawn_layer::<(), (), _>(layer);
    handle.allow(0);
    assert_ready_ok!(
        svc.poll_ready(),
        "fail fast even when the inner service is not ready"
    );
    assert!(svc.call(()).await.is_err());
    handle.allow(1);
    let h2 = svc.get_ref().handle();
    h2.force_closed();
    assert_ready_ok!(svc.poll_ready());
    let mut f = tokio_test::task::spawn(svc.call(()));
    assert_pending!(f.poll());
}

/// A service made ready before the breaker was forced open does not let its call
/// through: `call` decides admission again when a transition came in between (a
/// caller that does other work between `ready()` and `call`).
#[tokio::test(start_paused = true)]
async fn a_call_made_ready_before_a_forced_open_is_rejected() {
    let (mut svc, mut handle, breaker) = one_failure_mock();
    assert_ready_ok!(svc.poll_ready());
    breaker.force_open();
    let mut call = tokio_test::task::spawn(svc.call(()));
    open_error(tokio_test::assert_ready!(
        call.poll(),
        "the inner service was called"
    ));
    let mut called = tokio_test::task::spawn(handle.next_request());
    assert_pending!(called.poll(), "the inner service was called");
    // And once closed again, a call made ready before goes through.
    breaker.force_closed();
    assert_ready_ok!(svc.poll_ready());
    breaker.reset();
    let mut call = tokio_test::task::spawn(svc.call(()));
    assert_pending!(call.poll());
    assert!(called.poll().is_ready(), "the call went through");
}

/// A call admitted while the inner service was not ready (waiting for a bulkhead
/// inside) does not go through once the breaker has opened meanwhile: admission is
/// decided again by the current state. (Before, the old admission was kept, and every
/// call queued behind a full bulkhead reached the failing dependency after the trip.)
#[tokio::test(start_paused = true)]
async fn a_call_admitted_before_the_breaker_opened_is_rejected_once_ready() {
    let (mut svc, mut handle, breaker) = one_failure_mock();
    handle.allow(0);
    assert_pending!(svc.poll_ready(), "admitted, waiting for the inner service");
    breaker.force_open();
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let mut call = tokio_test::task::spawn(svc.call(()));
    open_error(tokio_test::assert_ready!(
        call.poll(),
        "the inner service was called"
    ));
    let mut called = tokio_test::task::spawn(handle.next_request());
    assert_pending!(called.poll(), "the inner service was called");
}

/// A caller that polls once and calls later (`tower::steer`, a balancer) gets the
/// rejection as the breaker stands at the call: closed by hand since, not a forced
/// rejection (which a retry never repeats) but one with no wait; its break over since,
/// no wait left. (The rejection seen by `poll_ready` was returned as it was.)
#[tokio::test(start_paused = true)]
async fn a_rejection_called_after_the_breaker_moved_on_says_what_holds_now() {
    let (mut svc, mut handle, breaker) = one_failure_mock();
    breaker.force_open();
    assert_ready_ok!(svc.poll_ready());
    breaker.force_closed();
    let o = open_error(svc.call(()).await);
    assert!(!o.is_forced(), "the breaker is closed");
    assert_eq!(o.retry_after(), Duration::ZERO);
    assert_eq!(breaker.state(), State::Closed);

    trip(&mut svc, &mut handle, &breaker).await;
    assert_ready_ok!(svc.poll_ready());
    let left = breaker.retry_after().expect("open");
    assert!(left > Duration::ZERO);
    advance(left).await;
    assert_eq!(breaker.retry_after(), Some(Duration::ZERO));
    let o = open_error(svc.call(()).await);
    assert_eq!(o.retry_after(), Duration::ZERO, "the break is over");
    assert_eq!(breaker.metrics().not_permitted(), 2);
    // The probe it was admitted for and could not use is given back.
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(());
    fut.await.unwrap();
}

/// A rejection `poll_ready` answered is not kept: polled again after the breaker was
/// closed by hand (or its break ended), the service admits the call; and a rejection
/// is counted once per call turned away, not per poll. (A balancer keeps a service
/// "ready" until it picks it: the stored rejection failed the call after the breaker
/// had closed, and this service never probed.)
#[tokio::test(start_paused = true)]
async fn a_rejection_answered_by_poll_ready_is_not_kept_once_the_breaker_closes() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .build()
        .unwrap();
    let breaker = layer.handle();
    breaker.force_open();
    let (mut svc, mut handle) = mock::spawn_layer::<(), (), _>(layer);
    for _ in 0..3 {
        assert_ready_ok!(svc.poll_ready(), "a rejection is ready at once");
    }
    assert_eq!(breaker.metrics().not_permitted(), 0, "counted per poll");
    breaker.force_closed();
    assert_ready_ok!(svc.poll_ready());
    let mut call = tokio_test::task::spawn(svc.call(()));
    assert_pending!(call.poll(), "the stored rejection was answered");
    let mut next = tokio_test::task::spawn(handle.next_request());
    let (_, send) = tokio_test::assert_ready!(next.poll()).expect("the call goes through");
    send.send_response(());
    tokio_test::assert_ready_ok!(call.poll());
    breaker.force_open();
    assert_ready_ok!(svc.poll_ready());
    assert_ready_ok!(svc.poll_ready());
    open_error(svc.call(()).await);
    assert_eq!(breaker.metrics().not_permitted(), 1);
}

// --- per key ----------------------------------------------------------------------------

/// A keyed test service: `(key, ok)` succeeds when `ok`, else fails.
async fn ok_unless_false<K>((_, ok): (K, bool)) -> Result<(), BoxError> {
    if ok {
        Ok(())
    } else {
        Err(BoxError::from("down"))
    }
}

#[tokio::test(start_paused = true)]
async fn per_key_breakers_are_isolated() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .keyed(|req: &(&'static str, bool)| req.0)
        .build()
        .unwrap();
    let keys = layer.handle();
    let mut svc = layer.layer(service_fn(ok_unless_false::<&'static str>));
    svc.ready()
        .await
        .unwrap()
        .call(("a", false))
        .await
        .unwrap_err();
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(("a", true))
        .await
        .unwrap_err();
    assert!(e.open().is_some());
    svc.ready().await.unwrap().call(("b", true)).await.unwrap();
    assert_eq!(keys.get(&"a").unwrap().state(), State::Open);
    assert_eq!(keys.get(&"b").unwrap().state(), State::Closed);
    assert_eq!(keys.get(&"a").unwrap().name(), "a");
}

/// A service whose `call` itself panics (a contract violation, caught by a server's
/// panic handler) when asked to; else it answers `Ok`.
#[derive(Clone)]
struct PanicsInCall;

impl Service<bool> for PanicsInCall {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, panic: bool) -> Self::Future {
        assert!(!panic, "call panicked");
        std::future::ready(Err(BoxError::from("down")))
    }
}

/// A half-open key whose probe's inner `call` panics gets its probe slot back (the
/// slot was taken before the guard that gives it back existed, so the key stayed
/// half-open with no slot, forever).
#[tokio::test(start_paused = true)]
async fn a_keyed_probe_whose_call_panics_gives_its_slot_back() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .permitted_probes(1)
        .break_duration(Duration::from_secs(1))
        .keyed(|_: &bool| "k")
        .build()
        .unwrap();
    let keys = layer.handle();
    let mut svc = layer.layer(PanicsInCall);
    svc.ready().await.unwrap().call(false).await.unwrap_err();
    advance(Duration::from_secs(1)).await;
    let ready = svc.ready().await.unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ready.call(true)));
    assert!(caught.is_err());
    assert_eq!(keys.get(&"k").unwrap().state(), State::HalfOpen);
    // The slot is free again: the next call is the probe, not rejected.
    let e = svc.ready().await.unwrap().call(false).await.unwrap_err();
    assert!(e.open().is_none(), "rejected: the probe slot leaked");
}

#[tokio::test(start_paused = true)]
async fn per_key_breakers_are_bounded_and_idle_ones_evicted() {
    let layer = CircuitBreakerLayer::builder()
        .keyed(|k: &u32| *k)
        .max_keys(2)
        .idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let keys = layer.handle();
    let mut svc = layer.layer(service_fn(|_: u32| async { Ok::<_, BoxError>(()) }));
    svc.ready().await.unwrap().call(1).await.unwrap();
    advance(Duration::from_secs(1)).await;
    svc.ready().await.unwrap().call(2).await.unwrap();
    // Full: the least recently used (1) goes.
    svc.ready().await.unwrap().call(3).await.unwrap();
    let mut k = keys.keys();
    k.sort();
    assert_eq!(k, [2, 3]);
    // Idle ones go first, and on demand.
    advance(Duration::from_secs(61)).await;
    keys.evict_idle();
    assert!(keys.is_empty());
}

/// A full map drops the least recently used *closed* breaker: an open one protects a
/// failing dependency, and a flood of new keys must not reset it.
#[tokio::test(start_paused = true)]
async fn a_full_key_map_evicts_closed_breakers_before_open_ones() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .keyed(|req: &(u32, bool)| req.0)
        .max_keys(2)
        .build()
        .unwrap();
    let keys = layer.handle();
    let mut svc = layer.layer(service_fn(ok_unless_false::<u32>));
    svc.ready()
        .await
        .unwrap()
        .call((1, false))
        .await
        .unwrap_err();
    advance(Duration::from_secs(1)).await;
    svc.ready().await.unwrap().call((2, true)).await.unwrap();
    advance(Duration::from_secs(1)).await;
    svc.ready().await.unwrap().call((3, true)).await.unwrap();
    let mut k = keys.keys();
    k.sort();
    assert_eq!(k, [1, 3], "the open breaker of 1 was dropped");
    assert_eq!(keys.get(&1).unwrap().state(), State::Open);
}

/// A full map makes room for a batch of new keys at once (1/64 of it), so a flood of
/// new keys does not scan the whole map once per key under the write lock; the batch
/// takes only closed breakers beyond the one needed.
#[tokio::test(start_paused = true)]
async fn a_full_key_map_evicts_a_batch_of_closed_breakers_only() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .keyed(|req: &(u32, bool)| req.0)
        .max_keys(128)
        .build()
        .unwrap();
    let keys = layer.handle();
    let mut svc = layer.layer(service_fn(ok_unless_false::<u32>));
    let mut call = async |key: u32, ok: bool| {
        advance(Duration::from_millis(1)).await;
        let _ = svc.ready().await.unwrap().call((key, ok)).await;
    };
    // 0 is open and the least recently used; 1 to 127 closed.
    for key in 0..128 {
        call(key, key != 0).await;
    }
    call(1000, true).await;
    assert_eq!(keys.len(), 127, "a batch of 2 went");
    assert!(keys.get(&0).is_some(), "the open breaker of 0 was dropped");
    assert!(keys.get(&1).is_none() && keys.get(&2).is_none());
    call(1001, true).await;
    assert_eq!(keys.len(), 128, "room was made for it already");

    // Nearly all open: the batch leaves them alone.
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .keyed(|req: &(u32, bool)| req.0)
        .max_keys(128)
        .build()
        .unwrap();
    let keys = layer.handle();
    let mut svc = layer.layer(service_fn(ok_unless_false::<u32>));
    let mut call = async |key: u32, ok: bool| {
        advance(Duration::from_millis(1)).await;
        let _ = svc.ready().await.unwrap().call((key, ok)).await;
    };
    for key in 0..128 {
        call(key, key == 127).await;
    }
    call(1000, true).await;
    assert_eq!(keys.len(), 128);
    assert!(keys.get(&127).is_none(), "the closed one goes");
    assert!((0..127).all(|k| keys.get(&k).is_some()), "an open one went");
}

/// An open breaker is not dropped as idle while its break lasts, however long no
/// call came: dropped, the key would come back as a fresh closed breaker and send
/// full traffic to the dependency it was shielding. Once the break is over it goes.
#[tokio::test(start_paused = true)]
async fn an_open_breaker_is_not_evicted_as_idle_before_its_break_ends() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .break_duration(Duration::from_secs(600))
        .keyed(|req: &(u32, bool)| req.0)
        .idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let keys = layer.handle();
    let mut svc = layer.layer(service_fn(ok_unless_false::<u32>));
    svc.ready()
        .await
        .unwrap()
        .call((1, false))
        .await
        .unwrap_err();
    svc.ready().await.unwrap().call((2, true)).await.unwrap();
    advance(Duration::from_secs(61)).await;
    keys.evict_idle();
    assert_eq!(
        keys.keys(),
        [1],
        "the idle closed breaker goes, the open one stays"
    );
    open_error(svc.ready().await.unwrap().call((1, true)).await);
    advance(Duration::from_secs(600)).await;
    keys.evict_idle();
    assert!(keys.is_empty(), "the break is over: idle again");
}

/// A breaker with a call in flight is not dropped: not as idle (its last admission is
/// long past when the call is slow), nor before a busier-looking idle one when the map
/// is full. Dropped, the slow call's failure would land in a breaker no one reads, and
/// the key's next breaker would start with an empty window and never trip.
#[tokio::test(start_paused = true)]
async fn a_breaker_with_a_call_in_flight_is_not_evicted() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .keyed(|req: &(u32, bool)| req.0)
        .max_keys(2)
        .idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let keys = layer.handle();
    // Key 1's calls fail, after two minutes.
    let svc = layer.layer(service_fn(|(key, ok): (u32, bool)| async move {
        if key == 1 {
            tokio::time::sleep(Duration::from_secs(120)).await;
        }
        if ok {
            Ok(())
        } else {
            Err(BoxError::from("boom"))
        }
    }));
    let slow = tokio::spawn(svc.clone().oneshot((1, false)));
    tokio::task::yield_now().await;
    advance(Duration::from_secs(61)).await;
    keys.evict_idle();
    assert_eq!(keys.keys(), [1], "dropped as idle with its call in flight");
    svc.clone().oneshot((2, true)).await.unwrap();
    svc.clone().oneshot((3, true)).await.unwrap();
    let mut k = keys.keys();
    k.sort();
    assert_eq!(k, [1, 3], "dropped to make room with its call in flight");
    // The first failure lands in the key's breaker; the second trips it.
    advance(Duration::from_secs(60)).await;
    slow.await.unwrap().unwrap_err();
    let _ = svc.clone().oneshot((1, false)).await;
    assert_eq!(keys.get(&1).unwrap().state(), State::Open);
}

/// With a seeded jitter each key draws its own break lengths: keys tripped together
/// do not all probe at the same instant. (Every key had the seed's sequence.)
#[tokio::test(start_paused = true)]
async fn seeded_jitter_differs_between_keys() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .break_duration(Duration::from_secs(100))
        .break_jitter(0.9)
        .jitter_seed(7)
        .keyed(|req: &(u32, bool)| req.0)
        .build()
        .unwrap();
    let keys = layer.handle();
    let mut svc = layer.layer(service_fn(ok_unless_false::<u32>));
    let mut breaks = Vec::new();
    for k in 1..=4 {
        svc.ready()
            .await
            .unwrap()
            .call((k, false))
            .await
            .unwrap_err();
        breaks.push(keys.get(&k).unwrap().retry_after().unwrap());
    }
    breaks.sort_unstable();
    breaks.dedup();
    assert_eq!(breaks.len(), 4, "keys shared a jitter sequence: {breaks:?}");
}

/// A breaker forced open (or disabled) by hand is not dropped, idle or not, when the
/// map is full: dropping it would bring a fresh closed breaker back and undo what the
/// operator set. (Before, manual states went first.)
#[tokio::test(start_paused = true)]
async fn a_state_set_by_hand_survives_eviction() {
    let layer = CircuitBreakerLayer::builder()
        .keyed(|req: &(u32, bool)| req.0)
        .max_keys(2)
        .idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let keys = layer.handle();
    let mut svc = layer.layer(service_fn(ok_unless_false::<u32>));
    svc.ready().await.unwrap().call((1, true)).await.unwrap();
    svc.ready().await.unwrap().call((2, true)).await.unwrap();
    keys.get(&1).unwrap().force_open();
    keys.get(&2).unwrap().disable();
    advance(Duration::from_secs(61)).await;
    keys.evict_idle();
    svc.ready().await.unwrap().call((3, true)).await.unwrap();
    advance(Duration::from_millis(1)).await;
    svc.ready().await.unwrap().call((4, true)).await.unwrap();
    svc.ready().await.unwrap().call((5, true)).await.unwrap();
    assert_eq!(keys.get(&1).unwrap().state(), State::ForcedOpen);
    assert_eq!(keys.get(&2).unwrap().state(), State::Disabled);
    open_error(svc.ready().await.unwrap().call((1, true)).await);
    let mut k = keys.keys();
    k.sort();
    assert_eq!(
        k,
        [1, 2, 4, 5],
        "3 made room for 5; the manual ones stay, on top of the bound"
    );
}

/// Breakers in a state set by hand count on top of `max_keys`: with as many of them as
/// the bound, a new key does not evict a breaker that is open, guarding a failing
/// dependency (it did, and full traffic went back to it).
#[tokio::test(start_paused = true)]
async fn states_set_by_hand_do_not_use_up_the_bound_and_evict_an_open_breaker() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .keyed(|req: &(u32, bool)| req.0)
        .max_keys(2)
        .build()
        .unwrap();
    let keys = layer.handle();
    keys.force_open(1);
    keys.disable(2);
    let mut svc = layer.layer(service_fn(ok_unless_false::<u32>));
    svc.ready()
        .await
        .unwrap()
        .call((3, false))
        .await
        .unwrap_err();
    assert_eq!(keys.get(&3).unwrap().state(), State::Open);
    svc.ready().await.unwrap().call((4, true)).await.unwrap();
    assert_eq!(keys.get(&3).map(|b| b.state()), Some(State::Open));
    open_error(svc.ready().await.unwrap().call((3, true)).await);
    // The bound still holds for the others: a third key evicts the closed one.
    svc.ready().await.unwrap().call((5, true)).await.unwrap();
    let mut k = keys.keys();
    k.sort();
    assert_eq!(k, [1, 2, 3, 5]);
}

/// A key can be cut off by hand before its first call (`get` finds no breaker for an
/// unseen key), the other keys go on, and closing it by hand lets it through again.
#[tokio::test(start_paused = true)]
async fn a_key_can_be_forced_open_before_its_first_call() {
    let layer = CircuitBreakerLayer::builder()
        .keyed(|req: &(u32, bool)| req.0)
        .max_keys(2)
        .build()
        .unwrap();
    let keys = layer.handle();
    assert!(keys.get(&7).is_none());
    keys.force_open(7);
    assert_eq!(keys.get(&7).unwrap().state(), State::ForcedOpen);
    let mut svc = layer.layer(service_fn(ok_unless_false::<u32>));
    open_error(svc.ready().await.unwrap().call((7, true)).await);
    // It stays while other keys come and go (a manual state is never evicted).
    for key in 1..5 {
        svc.ready().await.unwrap().call((key, true)).await.unwrap();
    }
    open_error(svc.ready().await.unwrap().call((7, true)).await);
    keys.force_closed(&7);
    svc.ready().await.unwrap().call((7, true)).await.unwrap();
    assert_eq!(keys.get_or_insert(9).state(), State::Closed);
}

#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn keyed_by_authority() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .keyed_by_authority()
        .build()
        .unwrap();
    let keys = layer.handle();
    let mut svc = layer.layer(service_fn(|req: http::Request<()>| async move {
        if req.uri().host() == Some("down.example") {
            Err(BoxError::from("down"))
        } else {
            Ok(())
        }
    }));
    let req = |uri: &str| http::Request::get(uri).body(()).unwrap();
    svc.ready()
        .await
        .unwrap()
        .call(req("http://down.example/x"))
        .await
        .unwrap_err();
    svc.ready()
        .await
        .unwrap()
        .call(req("http://up.example/x"))
        .await
        .unwrap();
    let key = http::uri::Authority::from_static;
    assert_eq!(keys.get(&key("down.example")).unwrap().state(), State::Open);
    // Without regard to case, as hosts are.
    assert_eq!(keys.get(&key("DOWN.example")).unwrap().state(), State::Open);
    assert_eq!(keys.get(&key("up.example")).unwrap().state(), State::Closed);
}

// --- concurrency ------------------------------------------------------------------------

/// 1000 callers start at the instant the breaker goes half-open; at most
/// `permitted_probes` reach the inner service, under several schedules.
#[test]
fn thousand_callers_at_half_open_admit_at_most_permitted_probes() {
    for (run, workers) in [(0, 2), (1, 4), (2, 8), (3, 3), (4, 16)] {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async move {
            let probes = 1 + run as u32 * 2;
            let layer = CircuitBreakerLayer::builder()
                .consecutive_failures(1)
                .permitted_probes(probes)
                // Over by the time the callers start: the first of them half-opens it.
                .break_duration(Duration::from_nanos(1))
                .build()
                .unwrap();
            let h = layer.handle();
            let reached = Arc::new(AtomicUsize::new(0));
            let gate = Arc::new(tokio::sync::Notify::new());
            let r = reached.clone();
            let g = gate.clone();
            let inner = service_fn(move |fail: bool| {
                r.fetch_add(1, SeqCst);
                let g = g.clone();
                async move {
                    if fail {
                        return Err(io::Error::other("down"));
                    }
                    // Probes hang until the test ends: none comes back to free a slot.
                    g.notified().await;
                    Ok(())
                }
            });
            let svc = layer.layer(inner);
            svc.clone().oneshot(true).await.unwrap_err();
            assert_eq!(h.state(), State::Open);
            reached.store(0, SeqCst);

            let barrier = Arc::new(tokio::sync::Barrier::new(1000));
            let rejected = Arc::new(AtomicUsize::new(0));
            let mut tasks = Vec::new();
            for _ in 0..1000 {
                let svc = svc.clone();
                let barrier = barrier.clone();
                let rejected = rejected.clone();
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    // A probe hangs here until aborted; a rejection returns at once.
                    let err = svc.oneshot(false).await.unwrap_err();
                    assert!(err.open().is_some());
                    rejected.fetch_add(1, SeqCst);
                }));
            }
            // Every caller has either reached the inner service or been rejected.
            let mut spins = 0u64;
            while rejected.load(SeqCst) + reached.load(SeqCst) < 1000 {
                tokio::task::yield_now().await;
                spins += 1;
                assert!(spins < 50_000_000, "callers never settled");
            }
            for t in &tasks {
                t.abort();
            }
            let reached = reached.load(SeqCst);
            assert!(
                reached <= probes as usize,
                "run {run}: {reached} > {probes} reached inner"
            );
            assert_eq!(reached, probes as usize, "run {run}: every slot was used");
            assert_eq!(h.metrics().not_permitted() as usize, 1000 - reached);
            assert_eq!(h.state(), State::HalfOpen);
        });
    }
}

/// A per-key breaker over a bulkhead every key shares: a call its open key rejects was
/// made ready first, which reserved a bulkhead permit; the rejection gives it back at
/// once. Kept by a caller (a retry waiting out the break keeps its service), the
/// permit was parked, and calls for other keys were turned away.
#[tokio::test(start_paused = true)]
async fn a_call_an_open_key_rejects_gives_back_what_readiness_reserved_inside() {
    let bulkhead = postbox::bulkhead::BulkheadLayer::new(1).unwrap();
    let breaker = CircuitBreakerLayer::builder()
        .keyed(|req: &&'static str| *req)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let mut svc = breaker.layer(bulkhead.layer(service_fn(|req: &'static str| async move {
        Ok::<_, BoxError>(req)
    })));
    handle.force_open("down");
    let rejected = svc.ready().await.unwrap().call("down").await;
    assert!(rejected.unwrap_err().open().is_some());
    assert_eq!(bulkhead.available_permits(), 1, "a permit is parked");
    let mut other = svc.clone();
    assert_eq!(other.ready().await.unwrap().call("up").await.unwrap(), "up");
    drop(svc);
}

/// A key's breaker made again after its last was dropped from the map counts its
/// transitions on from there: a hook that orders a name's transitions by generation
/// (and ignores older ones) does not take the new breaker's trip for a stale event.
#[tokio::test(start_paused = true)]
async fn a_keys_breaker_made_again_counts_its_generations_on() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .permitted_probes(1)
        .break_duration(Duration::from_secs(1))
        .on_transition(move |t: &Transition| {
            s.lock()
                .unwrap()
                .push((t.name().to_owned(), t.to(), t.generation()))
        })
        .keyed(|req: &(u32, bool)| req.0)
        .idle_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let keys = layer.handle();
    let mut svc = layer.layer(service_fn(ok_unless_false::<u32>));
    // Open, half-open, closed: generations 1 to 3.
    let _ = svc.ready().await.unwrap().call((1, false)).await;
    advance(Duration::from_secs(2)).await;
    let _ = svc.ready().await.unwrap().call((1, true)).await;
    let last = seen.lock().unwrap().last().unwrap().clone();
    assert_eq!(last, ("1".to_owned(), State::Closed, 3));
    // Idle, dropped, and made again by its next call, which trips it.
    advance(Duration::from_secs(11)).await;
    keys.evict_idle();
    assert!(keys.get(&1).is_none());
    let _ = svc.ready().await.unwrap().call((1, false)).await;
    let (name, to, generation) = seen.lock().unwrap().last().unwrap().clone();
    assert_eq!((name.as_str(), to), ("1", State::Open));
    assert!(
        generation > 3,
        "the new breaker's trip came as generation {generation}"
    );
}
