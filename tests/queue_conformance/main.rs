//! One conformance suite for every `Queue` backend: each behaviour is a generic async fn
//! in `suite`, and each backend module runs all of them with `conformance!`.
//!
//! Lease expiry and `not_before` use explicit `now` arguments, so the behaviours do not
//! sleep. One runs in real time on every backend, memory too: the `Replayer` end to end
//! (`replayer_delivers_every_message_once_through_an_idempotent_server`), whose queue
//! clock is the wall clock, which paused Tokio time does not move (about 150 ms on the
//! memory queue). The broker modules' own tests run against real servers, in real time.

#![allow(missing_docs, unreachable_pub)] // test crate: items are internal by nature

mod suite;

mod memory;

#[cfg(feature = "embedded")]
mod embedded;

#[cfg(any(feature = "nats", feature = "amqp", feature = "redis"))]
mod proxy;

#[cfg(any(feature = "nats", feature = "redis", feature = "amqp"))]
mod broker;

/// Runs `$call` until it does not fail with `Unavailable` (the connection is back).
#[cfg(any(feature = "nats", feature = "amqp"))]
macro_rules! retry {
    ($call:expr) => {{
        let mut out = None;
        for _ in 0..100 {
            match $call {
                Ok(v) => {
                    out = Some(v);
                    break;
                }
                Err(QueueError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("expected Unavailable, got {e}"),
            }
        }
        out.expect("did not reconnect")
    }};
}

#[cfg(feature = "nats")]
mod nats;

#[cfg(feature = "amqp")]
mod amqp;

#[cfg(feature = "redis")]
mod redis;
