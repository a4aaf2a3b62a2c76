//! One conformance suite for every `Queue` backend: each behaviour is a generic async fn
//! in `suite`, and each backend module runs all of them with `conformance!`.
//!
//! Lease expiry and `not_before` use explicit `now` arguments, so nothing sleeps.

#![allow(missing_docs, unreachable_pub)] // test crate: items are internal by nature

mod suite;

mod memory;

#[cfg(feature = "embedded")]
mod embedded;

#[cfg(any(feature = "nats", feature = "amqp"))]
mod proxy;

#[cfg(feature = "nats")]
mod nats;

#[cfg(feature = "amqp")]
mod amqp;

#[cfg(feature = "redis")]
mod redis;
