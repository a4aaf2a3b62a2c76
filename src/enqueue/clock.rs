//! Wall-clock time that follows tokio's clock, and time-ordered ids.
//!
//! Envelopes carry wall-clock times ([`SystemTime`]) because messages outlive the
//! process. The layer and the replayer read them through [`wall_now`], which anchors
//! the wall clock once per process and then advances it with
//! [`tokio::time::Instant`]: paused-time tests (`time::advance`) move it, and the layer
//! and replayer always agree. Over a process's lifetime this drifts from the system
//! clock only as much as the monotonic clock does (NTP slews).

use crate::queue::MessageId;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
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

/// A UUIDv7: 48-bit Unix milliseconds of `now`, version 7, variant `10`, random bits.
pub(crate) fn new_message_id(now: SystemTime) -> MessageId {
    let ms = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64;
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    let rand = fastrand::u128(..).to_be_bytes();
    b[6..].copy_from_slice(&rand[6..]);
    b[6] = (b[6] & 0x0f) | 0x70;
    b[8] = (b[8] & 0x3f) | 0x80;
    MessageId(b)
}

/// A fresh idempotency key: a UUIDv7 in hyphenated lowercase form.
///
/// Kept private on purpose: the HTTP helpers (`src/http/`) may offer a public one.
pub(crate) fn new_idempotency_key(now: SystemTime) -> String {
    new_message_id(now).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_v7_and_ordered_by_millisecond() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let a = new_message_id(t);
        let b = new_message_id(t + Duration::from_millis(1));
        assert!(a < b);
        assert_eq!(a.0[6] >> 4, 7);
        assert_eq!(a.0[8] >> 6, 0b10);
        assert_eq!(new_idempotency_key(t).len(), 36);
    }

    #[tokio::test(start_paused = true)]
    async fn wall_clock_follows_paused_time() {
        let a = wall_now();
        tokio::time::advance(Duration::from_secs(60)).await;
        let b = wall_now();
        assert!(b.duration_since(a).unwrap() >= Duration::from_secs(60));
    }
}
