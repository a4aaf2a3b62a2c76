#![doc = include_str!("docs/crate.md")]
#![doc = include_str!("docs/metrics.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod bulkhead;
pub mod circuit_breaker;
pub mod classify;
mod clock;
#[cfg(feature = "config")]
pub mod config;
pub mod duration;
pub mod enqueue;
pub mod error;
#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "http")]
pub mod idempotency;
pub mod queue;
pub mod retry;
pub mod timeout;

/// The boxed error type layers use once they add errors of their own (as in tower).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
