//! The happy path of every foundation layer allocates nothing per call.
//!
//! A counting global allocator (stats_alloc) measures the heap traffic of many calls
//! through each layer around a service that answers at once. Futures are polled with
//! a no-op waker, so nothing but the layers themselves runs.

use postbox::BoxError;
use postbox::bulkhead::BulkheadLayer;
use postbox::timeout::{AttemptTimeoutLayer, DeadlineLayer};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use std::future::{Future, Ready, ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tower::{Layer, Service, service_fn};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn inner()
-> impl Service<u64, Response = u64, Error = BoxError, Future = Ready<Result<u64, BoxError>>> + Clone
{
    service_fn(|x: u64| ready(Ok::<_, BoxError>(x)))
}

fn call_once<S: Service<u64, Response = u64>>(svc: &mut S, cx: &mut Context<'_>, x: u64) {
    assert!(matches!(svc.poll_ready(cx), Poll::Ready(Ok(()))));
    let fut = pin!(svc.call(x));
    match fut.poll(cx) {
        Poll::Ready(Ok(y)) => assert_eq!(y, x),
        _ => panic!("the inner service answers at once"),
    }
}

/// Allocations made by 1000 calls, after a warm-up call: the least of three runs, since
/// the counter is process-wide and the test harness's own threads occasionally allocate
/// while a run is measured. A layer that allocates per call shows at least 1000 in every
/// run.
fn allocations_per_1000_calls<S: Service<u64, Response = u64>>(mut svc: S) -> usize {
    let mut cx = Context::from_waker(Waker::noop());
    call_once(&mut svc, &mut cx, 0);
    (0..3)
        .map(|_| {
            let region = Region::new(GLOBAL);
            for x in 1..=1000 {
                call_once(&mut svc, &mut cx, x);
            }
            region.change().allocations
        })
        .min()
        .unwrap_or(usize::MAX)
}

// One test, so no other test thread allocates while a region is measured.
#[test]
fn foundation_layers_allocate_nothing_per_call() {
    // Guard against a counter that never counts.
    let region = Region::new(GLOBAL);
    drop(std::hint::black_box(vec![1u64, 2, 3]));
    assert!(
        region.change().allocations >= 1,
        "the counting allocator counts"
    );

    let attempt = AttemptTimeoutLayer::new(Duration::from_secs(1))
        .unwrap()
        .layer(inner());
    assert_eq!(allocations_per_1000_calls(attempt), 0, "attempt timeout");

    let deadline = DeadlineLayer::new(Duration::from_secs(1))
        .unwrap()
        .layer(inner());
    assert_eq!(allocations_per_1000_calls(deadline), 0, "deadline");

    let bulkhead = BulkheadLayer::new(8).unwrap().layer(inner());
    assert_eq!(allocations_per_1000_calls(bulkhead), 0, "bulkhead");

    let stack = DeadlineLayer::new(Duration::from_secs(2)).unwrap().layer(
        BulkheadLayer::new(8).unwrap().layer(
            AttemptTimeoutLayer::new(Duration::from_secs(1))
                .unwrap()
                .layer(inner()),
        ),
    );
    assert_eq!(
        allocations_per_1000_calls(stack),
        0,
        "deadline + bulkhead + attempt timeout"
    );
}
