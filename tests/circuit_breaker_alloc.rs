//! The breaker allocates nothing per call (one test: the counting allocator is global
//! to this test binary, so nothing may run beside it).

use postbox::BoxError;
use postbox::circuit_breaker::CircuitBreakerLayer;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use std::fmt;
use std::future::{Future, Ready, ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tower::{Layer, Service};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// A zero-sized error: boxing it allocates nothing, so only the breaker is measured.
#[derive(Debug)]
struct Down;

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("down")
    }
}

impl std::error::Error for Down {}

#[derive(Clone, Copy)]
struct Inner {
    fail: bool,
}

impl Service<()> for Inner {
    type Response = ();
    type Error = BoxError;
    type Future = Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        ready(if self.fail {
            Err(Box::new(Down))
        } else {
            Ok(())
        })
    }
}

/// Runs `n` calls to completion and returns the allocations they made.
fn allocations<S>(svc: &mut S, n: usize) -> usize
where
    S: Service<(), Response = ()>,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut once = |svc: &mut S| {
        assert!(svc.poll_ready(&mut cx).is_ready());
        let fut = pin!(svc.call(()));
        let Poll::Ready(out) = fut.poll(&mut cx) else {
            panic!("the inner future is ready at once")
        };
        drop(out);
    };
    for _ in 0..100 {
        once(svc); // warm up: lazy statics, first-use registrations
    }
    // The least of three runs: the counter is process-wide and the harness's own
    // threads occasionally allocate while a run is measured.
    (0..3)
        .map(|_| {
            let region = Region::new(GLOBAL);
            for _ in 0..n {
                once(svc);
            }
            region.change().allocations
        })
        .min()
        .unwrap_or(usize::MAX)
}

#[test]
fn no_allocation_per_call() {
    // Guard against a counter that never counts (every assertion below is `== 0`).
    let region = Region::new(GLOBAL);
    drop(std::hint::black_box(vec![1u64, 2, 3]));
    assert!(
        region.change().allocations >= 1,
        "the counting allocator counts"
    );
    let n = 1000;
    let build = |b: postbox::circuit_breaker::CircuitBreakerBuilder| b.build().unwrap();

    let mut closed = build(CircuitBreakerLayer::builder()).layer(Inner { fail: false });
    assert_eq!(allocations(&mut closed, n), 0, "closed, count window");

    let unreachable = CircuitBreakerLayer::builder()
        .count_window(100)
        .minimum_calls(100);
    let layer = build(unreachable);
    layer.handle().metrics_only();
    let mut failing = layer.layer(Inner { fail: true });
    assert_eq!(allocations(&mut failing, n), 0, "failing, count window");

    let mut time = build(CircuitBreakerLayer::builder().time_window(Duration::from_secs(10), 10))
        .layer(Inner { fail: false });
    assert_eq!(allocations(&mut time, n), 0, "closed, time window");

    let mut slow = build(CircuitBreakerLayer::builder().slow_calls(Duration::from_secs(1), 1.0))
        .layer(Inner { fail: false });
    assert_eq!(allocations(&mut slow, n), 0, "closed, slow-call tracking");

    let layer = build(CircuitBreakerLayer::builder());
    layer.handle().disable();
    let mut disabled = layer.layer(Inner { fail: false });
    assert_eq!(allocations(&mut disabled, n), 0, "disabled");

    // Open: the rejection is `Error::Open`, not boxed.
    let layer = build(
        CircuitBreakerLayer::builder()
            .consecutive_failures(1)
            .break_duration(Duration::from_secs(3600)),
    );
    let mut open = layer.layer(Inner { fail: true });
    allocations(&mut open, 1);
    assert_eq!(
        layer.handle().state(),
        postbox::circuit_breaker::State::Open
    );
    assert_eq!(allocations(&mut open, n), 0, "open");
}
