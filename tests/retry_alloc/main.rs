//! The retry layer allocates nothing per call when the request is cheap to clone and
//! the first attempt succeeds.
//!
//! A counting global allocator (stats_alloc) measures the heap traffic of many calls
//! around a service that answers at once; futures are polled with a no-op waker, so
//! nothing but the layer runs.

use postbox::BoxError;
use postbox::retry::{RetryBudget, RetryLayer};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use std::future::{Future, ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use tower::{Layer, Service, service_fn};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn call_once<S, Req>(svc: &mut S, cx: &mut Context<'_>, req: Req)
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    assert!(matches!(svc.poll_ready(cx), Poll::Ready(Ok(()))));
    let fut = pin!(svc.call(req));
    match fut.poll(cx) {
        Poll::Ready(Ok(_)) => {}
        _ => panic!("the inner service answers at once"),
    }
}

/// Allocations made by 1000 calls, after a warm-up call.
///
/// The allocator is global, so a harness thread allocating meanwhile shows up too: the
/// least of three runs is kept (a layer that allocated per call would show at least
/// 1000 in every run).
fn allocations_per_1000_calls<S, Req>(mut svc: S, make: impl Fn(u64) -> Req) -> usize
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    call_once(&mut svc, &mut cx, make(0));
    (0..3)
        .map(|_| {
            let region = Region::new(GLOBAL);
            for x in 1..=1000 {
                call_once(&mut svc, &mut cx, make(x));
            }
            region.change().allocations
        })
        .min()
        .unwrap()
}

/// [`allocations_per_1000_calls`] for a service whose every call fails.
fn allocations_per_1000_calls_failing<S>(mut svc: S) -> usize
where
    S: Service<u64>,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut call = |x| {
        assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        let fut = pin!(svc.call(x));
        assert!(matches!(fut.poll(&mut cx), Poll::Ready(Err(_))));
    };
    call(0);
    (0..3)
        .map(|_| {
            let region = Region::new(GLOBAL);
            for x in 1..=1000 {
                call(x);
            }
            region.change().allocations
        })
        .min()
        .unwrap()
}

// One test, so no other test thread allocates while a region is measured.
#[test]
fn retry_allocates_nothing_per_call_on_the_happy_path() {
    let region = Region::new(GLOBAL);
    drop(std::hint::black_box(vec![1u64, 2, 3]));
    assert!(
        region.change().allocations >= 1,
        "the counting allocator counts"
    );

    let inner = service_fn(|x: u64| ready(Ok::<_, BoxError>(x)));

    let no_budget = RetryLayer::builder()
        .no_budget()
        .build()
        .unwrap()
        .layer(inner);
    assert_eq!(
        allocations_per_1000_calls(no_budget, |x| x),
        0,
        "retry, no budget"
    );

    let with_budget = RetryLayer::builder()
        .budget(RetryBudget::new())
        .build()
        .unwrap()
        .layer(inner);
    assert_eq!(
        allocations_per_1000_calls(with_budget, |x| x),
        0,
        "retry with a budget"
    );

    // Giving up (here after the one retry, every call) allocates nothing either: the
    // give-up counter's label is a literal per reason (an expression as the label made
    // the macro build its label list, one allocation per failed call in an outage).
    let refused = service_fn(|_: u64| {
        ready(Err::<u64, _>(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )))
    });
    let gives_up = RetryLayer::builder()
        .max_retries(1)
        .backoff(postbox::retry::backoff::Backoff::constant(
            std::time::Duration::ZERO,
        ))
        .no_budget()
        .classifier(|_: Result<&u64, &std::io::Error>| {
            postbox::classify::Classification::failure().with_effect(false)
        })
        .build()
        .unwrap()
        .layer(refused);
    assert_eq!(
        allocations_per_1000_calls_failing(gives_up),
        0,
        "a retry that gives up"
    );

    #[cfg(feature = "http")]
    {
        // HTTP: a GET with no headers and a `()` body. Building the request allocates (its
        // URI), so the retry's share is the difference with the bare service: zero, as
        // cloning an empty header map and a parsed URI allocates nothing.
        let http_inner =
            service_fn(|_: http::Request<()>| ready(Ok::<_, BoxError>(http::Response::new(()))));
        let get = |_| http::Request::get("http://example.com/").body(()).unwrap();
        let bare = allocations_per_1000_calls(http_inner, get);
        let http = RetryLayer::http().build().unwrap().layer(http_inner);
        let with_retry = allocations_per_1000_calls(http, get);
        assert_eq!(with_retry, bare, "http retry adds no allocation");
    }
}
