//! Wall-clock time that follows tokio's clock, and fresh ids.
//!
//! Envelopes carry wall-clock times ([`SystemTime`]) because messages outlive the
//! process. The layer and the replayer read them through [`wall_now`]: the system
//! clock itself while tokio's clock runs, so a step of the system clock (an NTP
//! correction) or a suspended VM (whose monotonic clock stood still) shows at once,
//! as it does to the other processes sharing a broker queue. While tokio's clock is
//! paused (tests), the wall clock is anchored once per process and advanced with
//! [`tokio::time::Instant`], so `time::advance` moves it and a test's times are exact.

use crate::queue::MessageId;
use std::sync::OnceLock;
use std::time::SystemTime;
use tokio::time::Instant;

static ANCHOR: OnceLock<(SystemTime, Instant)> = OnceLock::new();

/// The current wall-clock time: the system's, or, while tokio's clock is paused, one
/// advanced by it.
pub(crate) fn wall_now() -> SystemTime {
    if !crate::clock::tokio_clock_is_paused() {
        return SystemTime::now();
    }
    #[cfg(test)]
    let skew = SKEW.with(std::cell::Cell::get);
    #[cfg(not(test))]
    let skew = std::time::Duration::ZERO;
    anchored(Instant::now()) + skew
}

#[cfg(test)]
thread_local! {
    /// How far this thread's paused wall clock has jumped (see [`jump_wall_clock`]).
    static SKEW: std::cell::Cell<std::time::Duration> =
        const { std::cell::Cell::new(std::time::Duration::ZERO) };
}

/// Moves this thread's paused wall clock on by `by` without tokio's clock: a suspended
/// VM resumed, or an NTP step (tests on a current-thread runtime).
#[cfg(test)]
pub(crate) fn jump_wall_clock(by: std::time::Duration) {
    SKEW.with(|s| s.set(s.get() + by));
}

/// The wall-clock time at `now` of tokio's clock, from the process's anchor.
fn anchored(now: Instant) -> SystemTime {
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

/// A fresh idempotency key: a UUIDv7 in hyphenated lowercase form, whose bits after the
/// timestamp cannot be worked out from other keys (a receipt shows its caller the key).
///
/// Kept private on purpose: the HTTP helpers (`src/http/`) may offer a public one.
pub(crate) fn new_idempotency_key() -> String {
    MessageId::new_key_v7().to_string()
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
        // A key shares nothing with the one before (ids made in one millisecond differ
        // by one): a caller shown its receipt's key cannot work out the next ones.
        let random = |k: String| {
            let id: MessageId = k.parse().unwrap();
            assert_eq!(id.0[6] >> 4, 7, "{k}");
            u128::from_be_bytes(id.0) & ((1 << 62) - 1)
        };
        let keys: Vec<u128> = (0..1000).map(|_| random(new_idempotency_key())).collect();
        for pair in keys.windows(2) {
            assert!(pair[0].abs_diff(pair[1]) > 1 << 32, "{pair:x?}");
        }
    }

    /// While tokio's clock runs, the wall clock is the system's (a step of the system
    /// clock or a suspend shows at once), not an anchor advanced by the monotonic
    /// clock.
    #[test]
    fn wall_clock_is_the_system_clock_while_tokio_runs() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        // The paused path would add this; the system clock does not.
        jump_wall_clock(Duration::from_secs(3600));
        for _ in 0..3 {
            let (before, got, after) =
                rt.block_on(async { (SystemTime::now(), wall_now(), SystemTime::now()) });
            assert!(
                before <= got && got <= after,
                "{before:?} {got:?} {after:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn wall_clock_follows_paused_time() {
        let a = wall_now();
        tokio::time::advance(Duration::from_secs(60)).await;
        let b = wall_now();
        assert!(b.duration_since(a).unwrap() >= Duration::from_secs(60));
    }
}
