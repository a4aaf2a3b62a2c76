//! Wall-clock time that follows tokio's clock, and fresh ids.
//!
//! Envelopes carry wall-clock times ([`SystemTime`]) because messages outlive the
//! process. The layer and the replayer read them through [`wall_now`], which anchors
//! the wall clock once per process and then advances it with
//! [`tokio::time::Instant`]: paused-time tests (`time::advance`) move it, and the layer
//! and replayer always agree. Over a process's lifetime this drifts from the system
//! clock only as much as the monotonic clock does (NTP slews).

use crate::queue::MessageId;
use std::sync::OnceLock;
use std::time::SystemTime;
use tokio::time::Instant;

static ANCHOR: OnceLock<(SystemTime, Instant)> = OnceLock::new();

/// The current wall-clock time, advanced by tokio's (pausable) clock.
pub(crate) fn wall_now() -> SystemTime {
    let now = Instant::now();
    let (sys, at) = *ANCHOR.get_or_init(|| (SystemTime::now(), now));
    if now >= at {
        sys + (now - at)
    } else {
        sys.checked_sub(at - now).unwrap_or(sys)
    }
}

/// A fresh message id (UUIDv7, strictly increasing within the process).
pub(crate) fn new_message_id() -> MessageId {
    MessageId::new_v7()
}

/// A fresh idempotency key: a UUIDv7 in hyphenated lowercase form.
///
/// Kept private on purpose: the HTTP helpers (`src/http/`) may offer a public one.
pub(crate) fn new_idempotency_key() -> String {
    MessageId::new_v7().to_string()
}

/// Whether `key` is a key at all: not empty or blank (the server's `Idempotency` layer
/// reads a blank header as none). What else a transport can carry is its codec's
/// business (the HTTP codec reads only keys a header can hold).
pub(crate) fn usable_key(key: &str) -> bool {
    !key.trim().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_blank_key_is_no_key() {
        for key in ["k", "order-42", " padded ", "clé"] {
            assert!(usable_key(key), "{key:?}");
        }
        for key in ["", "  ", "\t", " \n "] {
            assert!(!usable_key(key), "{key:?}");
        }
    }

    #[test]
    fn ids_and_keys_are_fresh_v7s() {
        let (a, b) = (new_message_id(), new_message_id());
        assert!(a < b);
        assert_eq!(a.0[6] >> 4, 7);
        let key = new_idempotency_key();
        assert_eq!(key.len(), 36);
        assert_ne!(key, new_idempotency_key());
    }

    #[tokio::test(start_paused = true)]
    async fn wall_clock_follows_paused_time() {
        let a = wall_now();
        tokio::time::advance(Duration::from_secs(60)).await;
        let b = wall_now();
        assert!(b.duration_since(a).unwrap() >= Duration::from_secs(60));
    }
}
