//! Receipts: what the caller gets instead of an answer when a request was deferred.

use crate::queue::{DeferReason, MessageId};
use std::time::SystemTime;

/// Header of a `202 Accepted` receipt carrying the message id (hyphenated UUIDv7).
pub const MESSAGE_ID_HEADER: &str = "postbox-message-id";
/// Header carrying the idempotency key: set on the original attempt (unless the request
/// already had one), echoed on the receipt, and sent again on every replay.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Header of a receipt saying why the request was deferred: `circuit-open`,
/// `bulkhead-full`, `retries-exhausted` or `deadline-elapsed`.
pub const DEFER_REASON_HEADER: &str = "postbox-defer-reason";
/// Header (`true`) of a receipt for a request that was not stored because a message with
/// its idempotency key was already pending or in flight ([`Receipt::is_duplicate`]).
///
/// The queue de-duplicates on the key alone: a *different* request that reuses a key
/// still pending is answered this way too and is never sent. Keys must name one
/// request (as the IETF Idempotency-Key draft requires of clients).
pub const DUPLICATE_HEADER: &str = "postbox-duplicate";

/// Proof that a request was stored durably for later delivery.
///
/// Returned only after [`Queue::enqueue`](crate::queue::Queue::enqueue) reported the
/// message durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    id: MessageId,
    idempotency_key: String,
    reason: DeferReason,
    not_before: SystemTime,
    duplicate: bool,
}

// === impl Receipt ===

impl Receipt {
    pub(crate) fn new(
        id: MessageId,
        idempotency_key: String,
        reason: DeferReason,
        not_before: SystemTime,
        duplicate: bool,
    ) -> Self {
        Self {
            id,
            idempotency_key,
            reason,
            not_before,
            duplicate,
        }
    }

    /// The stored message's id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The idempotency key the request was (and will be) sent with.
    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }

    /// Why the request was deferred.
    pub fn reason(&self) -> DeferReason {
        self.reason
    }

    /// The message is not replayed before this time. For a
    /// [duplicate](Self::is_duplicate) it is the time this request's failure asked for;
    /// the message already stored keeps its own (the queue does not report it).
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// `true` if a message with the same idempotency key was already pending or in
    /// flight: nothing new was stored, [`id`](Self::id) is the existing message's (the
    /// HTTP receipt says so in [`DUPLICATE_HEADER`]). The queue compares keys only, not
    /// the requests: see [`DUPLICATE_HEADER`].
    pub fn is_duplicate(&self) -> bool {
        self.duplicate
    }
}

/// The value of [`DEFER_REASON_HEADER`] for `reason`.
pub fn reason_str(reason: DeferReason) -> &'static str {
    match reason {
        DeferReason::CircuitOpen => "circuit-open",
        DeferReason::BulkheadFull => "bulkhead-full",
        DeferReason::RetriesExhausted => "retries-exhausted",
        DeferReason::DeadlineElapsed => "deadline-elapsed",
    }
}

/// The outcome of the typed flavour ([`Defer`](super::Defer)): the inner service's
/// response, or a receipt for a request stored for later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deferred<Res> {
    /// The call completed (successfully or with a response the policy does not defer).
    Completed(Res),
    /// The call was deferred and the request is stored durably.
    Enqueued(Receipt),
}

// === impl Deferred ===

impl<Res> Deferred<Res> {
    /// `true` for [`Deferred::Enqueued`].
    pub fn is_enqueued(&self) -> bool {
        matches!(self, Deferred::Enqueued(_))
    }

    /// The response, if the call completed.
    pub fn completed(self) -> Option<Res> {
        match self {
            Deferred::Completed(res) => Some(res),
            Deferred::Enqueued(_) => None,
        }
    }

    /// The receipt, if the call was deferred.
    pub fn receipt(&self) -> Option<&Receipt> {
        match self {
            Deferred::Completed(_) => None,
            Deferred::Enqueued(r) => Some(r),
        }
    }
}
