//! HTTP glue: reqwest as a `tower::Service`, and errors answered as responses for axum.

#[cfg(feature = "reqwest")]
pub mod reqwest;
mod respond;

pub use self::respond::{ErrorResponse, ErrorResponseLayer};
