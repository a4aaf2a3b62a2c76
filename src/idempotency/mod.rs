//! Idempotency (in progress).
