//! What the broker queues that hold deliveries in the process (NATS, RabbitMQ) share:
//! a held delivery's state, making room in a full hold, and finishing a settling call
//! that its caller stopped waiting for.

use super::{MessageId, QueueError};
use std::future::Future;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::instrument::{Instrument, WithSubscriber};

/// A held delivery: waiting for its not-before, or leased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeldState {
    /// Not to be leased before this.
    Scheduled(SystemTime),
    /// Leased until this, as generation `.1`.
    Leased(SystemTime, u64),
}

impl HeldState {
    /// Whether a lease at `now` may take the delivery.
    pub(crate) fn due(self, now: SystemTime) -> bool {
        match self {
            HeldState::Scheduled(nb) => nb <= now,
            HeldState::Leased(until, _) => until <= now,
        }
    }
}

/// Whether a lease at `now` may take a held delivery in `state` whose message is due at
/// `not_before`: both are due (a lease that ended still waits for the not-before of a
/// second copy merged in meanwhile).
pub(crate) fn leasable(state: HeldState, not_before: SystemTime, now: SystemTime) -> bool {
    state.due(now) && not_before <= now
}

/// What a held delivery whose message is due at `not_before` waits for at `now`: its
/// state, but a lease that ended on a message whose not-before is later (a second copy
/// of it moved that later) waits scheduled for that not-before. (Its state stays
/// leased: the lease's holder may still settle it, and it counts as an attempt.)
pub(crate) fn waiting(state: HeldState, not_before: SystemTime, now: SystemTime) -> HeldState {
    match state {
        HeldState::Leased(until, _) if until <= now && not_before > now => {
            HeldState::Scheduled(not_before)
        }
        state => state,
    }
}

/// At most this many deliveries are moved to the tail by one lease making room.
pub(crate) const MOVE_AT_ONCE: usize = 16;

/// A moved delivery not fetched back by this process within this long is taken to have
/// gone to another process (or its copy to have been settled).
pub(crate) const MOVED_FOR: Duration = Duration::from_secs(60);

/// The held deliveries to move to make room for `n` more (at most [`MOVE_AT_ONCE`],
/// and at most `behind`, what waits behind the hold): those scheduled after `now`,
/// due last first.
pub(crate) fn due_last(
    held: impl Iterator<Item = (MessageId, HeldState)>,
    n: usize,
    behind: u64,
    now: SystemTime,
) -> Vec<(SystemTime, MessageId)> {
    let mut later: Vec<(SystemTime, MessageId)> = held
        .filter_map(|(id, state)| match state {
            HeldState::Scheduled(nb) if nb > now => Some((nb, id)),
            _ => None,
        })
        .collect();
    later.sort_unstable_by(|a, b| b.cmp(a));
    later.truncate(
        n.min(usize::try_from(behind).unwrap_or(usize::MAX))
            .min(MOVE_AT_ONCE),
    );
    later
}

/// Spaces out the leases that make room in a full hold while doing so brings nothing
/// due: what waits behind the hold may be other retries not yet due (a dependency
/// down), and moving deliveries round for them on every poll would republish up to
/// [`MOVE_AT_ONCE`] whole messages each time. After a move that fetched nothing due the
/// next waits 1 s, doubling up to 30 s; a move that fetched something due resets it.
#[derive(Debug)]
pub(crate) struct RoomPacer {
    next: Option<Instant>,
    wait: Duration,
}

impl Default for RoomPacer {
    fn default() -> Self {
        Self::new()
    }
}

impl RoomPacer {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    pub(crate) const fn new() -> Self {
        Self {
            next: None,
            wait: Self::FIRST,
        }
    }

    /// Whether a lease may make room now.
    pub(crate) fn may(&self) -> bool {
        self.next.is_none_or(|next| Instant::now() >= next)
    }

    /// The hold is not full: the next time it is, room may be made at once, and a move
    /// that brings nothing due pauses the shortest time.
    pub(crate) fn calm(&mut self) {
        if self.next.is_some() {
            *self = Self::new();
        }
    }

    /// Room was made: `useful` if what it fetched included something due.
    pub(crate) fn made(&mut self, useful: bool) {
        if useful {
            *self = Self::new();
        } else {
            self.next = Some(Instant::now() + self.wait);
            self.wait = (self.wait * 2).min(Self::MAX);
        }
    }
}

/// Runs `call`, which settles leases held in this process, on a task of its own (in
/// the caller's span, reporting to the caller's subscriber): a caller that stops waiting (a timeout around `ack`) does not
/// stop it halfway, after it took a delivery out of the process' hold but before it
/// settled it with the broker.
pub(crate) async fn settling<T: Send + 'static>(
    call: impl Future<Output = Result<T, QueueError>> + Send + 'static,
) -> Result<T, QueueError> {
    match tokio::spawn(call.in_current_span().with_current_subscriber()).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(QueueError::Unavailable(
            "the runtime shut down during the call".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A move that brings nothing due pauses the next 1 s, then 2 s, …, up to 30 s; one
    /// that brings something due, or a hold that is not full, ends the pause and starts
    /// the next from 1 s.
    #[tokio::test(start_paused = true)]
    async fn room_is_made_less_often_while_it_brings_nothing_due() {
        let mut p = RoomPacer::new();
        assert!(p.may());
        p.made(false);
        assert!(!p.may());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(p.may());
        p.made(false);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!p.may(), "the second pause is 2 s");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(p.may());
        for _ in 0..10 {
            p.made(false);
        }
        tokio::time::advance(Duration::from_millis(29_999)).await;
        assert!(!p.may(), "the pause grew to 30 s");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(p.may(), "the pause stops growing at 30 s");
        p.made(false);
        p.calm();
        assert!(p.may(), "a hold that is not full ends the pause");
        p.made(false);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(p.may(), "and the next pause is 1 s again");
        p.made(false);
        p.made(true);
        assert!(p.may(), "a move that brought something due ends the pause");
    }
}
