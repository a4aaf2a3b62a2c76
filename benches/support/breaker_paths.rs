//! The circuit-breaker paths that `benches/circuit_breaker.rs` times and
//! `examples/breaker_calls.rs` counts instructions of: one definition for both.
#![allow(dead_code, reason = "each user takes the paths it needs")]

use postbox::BoxError;
use postbox::circuit_breaker::{CircuitBreakerLayer, State};
use std::fmt;
use std::future::{Ready, ready};
use std::time::Duration;
use tower::{Layer, ServiceExt, service_fn};

/// A zero-sized error: failing costs no allocation in the inner service.
#[derive(Debug)]
pub(crate) struct Down;

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("down")
    }
}

impl std::error::Error for Down {}

/// The inner service of the succeeding paths: answers at once.
pub(crate) fn ok_fn(x: u32) -> Ready<Result<u32, BoxError>> {
    ready(Ok(x))
}

/// The inner service of the failing path: fails at once.
pub(crate) fn fail_fn(_: u32) -> Ready<Result<u32, BoxError>> {
    ready(Err(Box::new(Down)))
}

/// Closed, with the defaults (a count window).
pub(crate) fn closed() -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder().build().expect("valid")
}

/// Open for an hour: one failing call trips it.
pub(crate) async fn open() -> CircuitBreakerLayer {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .break_duration(Duration::from_secs(3600))
        .build()
        .expect("valid");
    let _ = layer.layer(service_fn(fail_fn)).oneshot(0).await;
    assert_eq!(layer.handle().state(), State::Open);
    layer
}

/// For an inner service that fails every call with no threshold reachable: metrics-only
/// mode records and evaluates the window but never trips (a count window caps
/// `minimum_calls` at its size, so a 100 % failure rate would otherwise trip it).
pub(crate) fn failing() -> CircuitBreakerLayer {
    let layer = CircuitBreakerLayer::builder()
        .count_window(100)
        .minimum_calls(100)
        .build()
        .expect("valid");
    layer.handle().metrics_only();
    layer
}

/// Closed, with a time window of 10 s in 10 buckets.
pub(crate) fn time_window() -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .time_window(Duration::from_secs(10), 10)
        .build()
        .expect("valid")
}
