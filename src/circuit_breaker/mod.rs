//! Circuit breaker: stops calling a failing dependency and rejects at once with
//! [`error::Open`] until it is time to probe again.

pub mod error;
