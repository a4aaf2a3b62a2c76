//! The envelope: a deferred request and everything needed to replay it.
//!
//! The binary encoding (`Envelope::encode` / `Envelope::decode`) is versioned and
//! documented in `docs/envelope.md` for consumers in other languages.

use bytes::Bytes;
use std::fmt;
use std::time::SystemTime;

/// A message id: a UUIDv7 (48-bit Unix-millisecond timestamp, then random bits), so
/// ids sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub [u8; 16]);

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl fmt::Display for MessageId {
    /// Hyphenated lowercase UUID form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        for (i, byte) in b.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Why a request was deferred instead of answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeferReason {
    /// The circuit breaker was open.
    CircuitOpen,
    /// The bulkhead was full.
    BulkheadFull,
    /// Every retry failed with a retryable failure.
    RetriesExhausted,
    /// The deadline elapsed.
    DeadlineElapsed,
}

/// A deferred request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Time-ordered id.
    pub id: MessageId,
    /// The key the receiving service de-duplicates on (also sent on the original
    /// attempt).
    pub idempotency_key: String,
    /// When the request was first made.
    pub created_at: SystemTime,
    /// Not to be delivered before this (from `Retry-After` or the breaker).
    pub not_before: SystemTime,
    /// Given up (dead-lettered) after this, if set.
    pub expires_at: Option<SystemTime>,
    /// Delivery attempts so far (leases).
    pub attempts: u32,
    /// Logical destination (for HTTP, the authority `host:port`).
    pub destination: String,
    /// Request method (`POST`; for non-HTTP requests, a codec-defined verb).
    pub method: String,
    /// Request URI (absolute for HTTP clients).
    pub uri: String,
    /// Request headers, in order; values are raw bytes.
    pub headers: Vec<(String, Bytes)>,
    /// Request body.
    pub body: Bytes,
    /// Why it was deferred.
    pub reason: DeferReason,
}

/// An envelope could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// Input ended before the envelope did.
    Truncated,
    /// Not an envelope (bad magic).
    BadMagic,
    /// A format version this build does not know.
    UnknownVersion(u8),
    /// A field has an invalid value.
    Invalid(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("envelope truncated"),
            DecodeError::BadMagic => f.write_str("not a postbox envelope (bad magic)"),
            DecodeError::UnknownVersion(v) => write!(f, "unknown envelope version {v}"),
            DecodeError::Invalid(field) => write!(f, "invalid envelope field `{field}`"),
        }
    }
}

impl std::error::Error for DecodeError {}
