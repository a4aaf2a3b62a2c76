//! Generic behaviours every `Queue` backend must have.

use bytes::Bytes;
use postbox::queue::{DeferReason, Enqueued, Envelope, LeaseToken, MessageId, Queue, QueueError};
use std::time::{Duration, SystemTime};

const LEASE: Duration = Duration::from_secs(30);

/// Runs every behaviour against a backend. `$make` builds a fresh, empty queue as
/// `(queue, guard)` (the guard keeps e.g. a temp dir alive); `$make_cap` does the same
/// with a capacity.
#[macro_export]
macro_rules! conformance {
    ($make:expr, $make_cap:expr) => {
        $crate::conformance!(@tests $make, $make_cap;
            enqueue_then_lease_returns_the_envelope,
            lease_is_fifo_by_id,
            lease_respects_max,
            a_lease_of_usize_max_takes_what_is_due,
            not_before_defers_delivery,
            a_not_before_months_away_waits_and_leasing_goes_on,
            lease_uses_the_given_now_not_the_clock,
            a_message_made_ready_at_a_later_now_is_not_leased_at_an_earlier_one,
            expired_lease_returns_to_pending,
            stale_token_is_refused,
            ack_removes_message_and_frees_key,
            duplicate_key_while_pending_is_not_stored_twice,
            duplicate_key_while_in_flight_is_not_stored_twice,
            retry_later_defers_and_keeps_attempts,
            release_defers_without_counting_the_delivery,
            dead_letter_moves_message_and_frees_key,
            attempts_count_every_lease_until_dead_letter,
            enqueued_attempts_are_kept,
            ack_batch_acks_every_token,
            ack_with_a_stale_token_acks_the_rest,
            ack_names_the_first_stale_token_of_leases_settled_otherwise,
            a_keyless_message_is_never_deduplicated_and_a_blank_key_is_a_key,
            depth_counts_each_state,
            concurrent_enqueues_are_all_stored,
            redrive_moves_dead_letters_back_as_fresh_copies,
            redrive_moves_the_oldest_dead_letters_up_to_max,
            a_redriven_dead_letter_whose_key_is_live_is_not_stored_twice,
            discard_deletes_only_the_named_dead_letters,
            discard_finds_a_dead_letter_behind_hundreds_of_others,
        );
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn full_queue_refuses_enqueue() {
            let (q, _guard) = ($make_cap)(2);
            $crate::suite::full_queue_refuses_enqueue(q).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_redrive_into_a_full_queue_moves_what_fits_and_keeps_the_rest_dead() {
            let (q, _guard) = ($make_cap)(2);
            $crate::suite::a_redrive_into_a_full_queue_moves_what_fits_and_keeps_the_rest_dead(q)
                .await;
        }
        #[cfg(feature = "http")]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn replayer_delivers_every_message_once_through_an_idempotent_server() {
            let (q, _guard) = ($make)();
            $crate::suite::replayer_delivers_every_message_once_through_an_idempotent_server(q)
                .await;
        }
    };
    (@tests $make:expr, $make_cap:expr; $($name:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (q, _guard) = ($make)();
                $crate::suite::$name(q).await;
            }
        )*
    };
}

/// A fixed base time, so tests are independent of the clock.
pub fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000)
}

pub fn at(secs: u64) -> SystemTime {
    t0() + Duration::from_secs(secs)
}

/// Enqueues a message (key `good`) and leases all that is due at `t0()`: it is the only
/// message leased, whatever else the batch held. Returns its id.
#[cfg(any(feature = "nats", feature = "redis"))]
pub async fn only_the_good_message_is_leased(q: &impl Queue) -> MessageId {
    let good = q.enqueue(envelope("good")).await.unwrap().id();
    let leased = q.lease(10, Duration::from_secs(30), t0()).await.unwrap();
    let ids: Vec<_> = leased.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![good]);
    good
}

/// An envelope due at `t0()` with key `key`.
pub fn envelope(key: &str) -> Envelope {
    let mut e = Envelope::new(
        "api:443",
        "POST",
        "https://api/orders",
        Bytes::from(format!("body of {key}")),
        DeferReason::RetriesExhausted,
    );
    e.idempotency_key = key.to_owned();
    e.created_at = t0();
    e.not_before = t0();
    e.headers = vec![(
        "content-type".into(),
        Bytes::from_static(b"application/json"),
    )];
    e
}

async fn stored(q: &impl Queue, e: Envelope) -> MessageId {
    match q.enqueue(e).await.expect("enqueue") {
        Enqueued::Stored(id) => id,
        other => panic!("expected Stored, got {other:?}"),
    }
}

fn ids(leased: &[postbox::queue::Leased]) -> Vec<MessageId> {
    leased.iter().map(|l| l.envelope.id).collect()
}

pub async fn enqueue_then_lease_returns_the_envelope(q: impl Queue) {
    let e = envelope("a");
    let id = stored(&q, e.clone()).await;
    assert_eq!(id, e.id);
    let leased = q.lease(10, LEASE, at(1)).await.unwrap();
    assert_eq!(leased.len(), 1);
    let l = &leased[0];
    let mut expected = e;
    expected.attempts = 1;
    assert_eq!(l.envelope, expected);
    assert_eq!(l.token.id, id);
    assert_eq!(l.lease_until, at(1) + LEASE);
    assert!(
        q.lease(10, LEASE, at(2)).await.unwrap().is_empty(),
        "leased twice"
    );
}

pub async fn lease_is_fifo_by_id(q: impl Queue) {
    let mut sent = Vec::new();
    for i in 0..6 {
        sent.push(stored(&q, envelope(&format!("k{i}"))).await);
    }
    let first = q.lease(4, LEASE, at(1)).await.unwrap();
    assert_eq!(ids(&first), sent[..4]);
    let rest = q.lease(4, LEASE, at(1)).await.unwrap();
    assert_eq!(ids(&rest), sent[4..]);
}

pub async fn lease_respects_max(q: impl Queue) {
    for i in 0..5 {
        stored(&q, envelope(&format!("k{i}"))).await;
    }
    assert!(q.lease(0, LEASE, at(1)).await.unwrap().is_empty());
    assert_eq!(q.lease(2, LEASE, at(1)).await.unwrap().len(), 2);
    assert_eq!(q.lease(100, LEASE, at(1)).await.unwrap().len(), 3);
}

/// `max` is an upper bound, not a size to allocate or pass on as is.
pub async fn a_lease_of_usize_max_takes_what_is_due(q: impl Queue) {
    let id = stored(&q, envelope("a")).await;
    assert_eq!(
        ids(&q.lease(usize::MAX, LEASE, at(0)).await.unwrap()),
        vec![id]
    );
}

/// Not in `conformance!` (a broker may cap lease times): the in-process backends run it
/// themselves.
pub async fn endless_lease_does_not_expire(q: impl Queue) {
    stored(&q, envelope("a")).await;
    let l = q.lease(1, Duration::MAX, at(0)).await.unwrap();
    assert!(l[0].lease_until > at(100 * 365 * 24 * 3600));
    assert!(q.lease(1, LEASE, at(1_000_000)).await.unwrap().is_empty());
    q.ack(&[l[0].token]).await.unwrap();
}

pub async fn not_before_defers_delivery(q: impl Queue) {
    let mut later = envelope("later");
    later.not_before = at(60);
    let later_id = stored(&q, later).await;
    let now_id = stored(&q, envelope("now")).await;
    let first = q.lease(10, LEASE, at(1)).await.unwrap();
    assert_eq!(ids(&first), vec![now_id]);
    q.ack(&[first[0].token]).await.unwrap();
    assert!(q.lease(10, LEASE, at(59)).await.unwrap().is_empty());
    assert_eq!(
        ids(&q.lease(10, LEASE, at(60)).await.unwrap()),
        vec![later_id]
    );
}

/// A not-before months away (a huge `Retry-After`) waits, and leasing goes on for the
/// other messages (RabbitMQ refuses a per-message TTL over 2^32 - 1 ms, 49.7 days, and
/// closes the channel).
pub async fn a_not_before_months_away_waits_and_leasing_goes_on(q: impl Queue) {
    let mut far = envelope("far");
    far.not_before = at(100 * 24 * 3600);
    stored(&q, far).await;
    let now_id = stored(&q, envelope("now")).await;
    let first = q.lease(10, LEASE, at(0)).await.unwrap();
    assert_eq!(ids(&first), vec![now_id]);
    q.ack(&[first[0].token]).await.unwrap();
    let next_id = stored(&q, envelope("next")).await;
    assert_eq!(
        ids(&q.lease(10, LEASE, at(1)).await.unwrap()),
        vec![next_id]
    );
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.pending + depth.in_flight, depth.dead), (2, 0));
}

/// A message already due by the system clock is still not leased at an earlier `now`.
pub async fn lease_uses_the_given_now_not_the_clock(q: impl Queue) {
    let clock = SystemTime::now();
    let mut e = envelope("a");
    e.not_before = clock - Duration::from_secs(10);
    let id = stored(&q, e).await;
    let past = clock - Duration::from_secs(20);
    assert!(q.lease(10, LEASE, past).await.unwrap().is_empty());
    assert_eq!(q.depth().await.unwrap().pending, 1);
    assert_eq!(ids(&q.lease(10, LEASE, clock).await.unwrap()), vec![id]);
}

/// `not_before <= now` holds for every message leased, even one an earlier call with a
/// later `now` already found due (two replayers with clocks apart), and one that call
/// read but had no room to lease.
pub async fn a_message_made_ready_at_a_later_now_is_not_leased_at_an_earlier_one(q: impl Queue) {
    let mut due_at_5 = Vec::new();
    for key in ["a", "b"] {
        let mut e = envelope(key);
        e.not_before = at(5);
        due_at_5.push(stored(&q, e).await);
    }
    let first = q.lease(1, LEASE, at(10)).await.unwrap();
    assert_eq!(ids(&first), vec![due_at_5[0]]);
    let early = q.lease(10, LEASE, at(0)).await.unwrap();
    assert!(early.is_empty(), "leased before due: {:?}", ids(&early));
    let second = q.lease(10, LEASE, at(5)).await.unwrap();
    assert_eq!(ids(&second), vec![due_at_5[1]]);
    q.ack(&[first[0].token, second[0].token]).await.unwrap();

    // A lease that finds an expired lease and reads two more due messages, with room
    // for two: the one left over is not due for a lease at an earlier `now`.
    let x = stored(&q, envelope("x")).await;
    assert_eq!(ids(&q.lease(1, LEASE, at(0)).await.unwrap()), vec![x]);
    let mut later = Vec::new();
    for key in ["c", "d"] {
        let mut e = envelope(key);
        e.not_before = at(50);
        later.push(stored(&q, e).await);
    }
    let two = q.lease(2, LEASE, at(60)).await.unwrap();
    assert_eq!(ids(&two), vec![x, later[0]]);
    let early = q.lease(10, LEASE, at(40)).await.unwrap();
    assert!(early.is_empty(), "leased before due: {:?}", ids(&early));
    assert_eq!(
        ids(&q.lease(10, LEASE, at(50)).await.unwrap()),
        vec![later[1]]
    );
}

pub async fn expired_lease_returns_to_pending(q: impl Queue) {
    let id = stored(&q, envelope("a")).await;
    let first = q.lease(10, LEASE, at(0)).await.unwrap();
    assert_eq!(first[0].envelope.attempts, 1);
    assert!(
        q.lease(10, LEASE, at(29)).await.unwrap().is_empty(),
        "lease still held"
    );
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.pending, depth.in_flight), (0, 1));
    let again = q.lease(10, LEASE, at(30)).await.unwrap();
    assert_eq!(ids(&again), vec![id]);
    assert_eq!(again[0].envelope.attempts, 2);
    assert!(again[0].token.generation > first[0].token.generation);
}

pub async fn stale_token_is_refused(q: impl Queue) {
    stored(&q, envelope("a")).await;
    let old = q.lease(1, LEASE, at(0)).await.unwrap()[0].token;
    let new = q.lease(1, LEASE, at(31)).await.unwrap()[0].token;
    assert!(matches!(q.ack(&[old]).await, Err(QueueError::LeaseLost(t)) if t == old));
    assert!(matches!(
        q.retry_later(old, at(99)).await,
        Err(QueueError::LeaseLost(_))
    ));
    assert!(matches!(
        q.dead_letter(old, "x").await,
        Err(QueueError::LeaseLost(_))
    ));
    q.ack(&[new]).await.unwrap();
    assert!(
        matches!(q.ack(&[new]).await, Err(QueueError::LeaseLost(_))),
        "acked twice"
    );
    let forged = LeaseToken {
        id: MessageId::new_v7(),
        generation: 1,
    };
    assert!(matches!(
        q.ack(&[forged]).await,
        Err(QueueError::LeaseLost(_))
    ));
}

pub async fn ack_removes_message_and_frees_key(q: impl Queue) {
    stored(&q, envelope("a")).await;
    let l = q.lease(1, LEASE, at(0)).await.unwrap();
    q.ack(&[l[0].token]).await.unwrap();
    assert_eq!(q.depth().await.unwrap(), Default::default());
    // Gone for good: not even an expired lease brings it back.
    assert!(q.lease(10, LEASE, at(3600)).await.unwrap().is_empty());
    // The key is free again.
    stored(&q, envelope("a")).await;
}

pub async fn duplicate_key_while_pending_is_not_stored_twice(q: impl Queue) {
    let first = stored(&q, envelope("same")).await;
    let again = q.enqueue(envelope("same")).await.unwrap();
    assert_eq!(again, Enqueued::Duplicate(first));
    assert_eq!(q.depth().await.unwrap().pending, 1);
}

pub async fn duplicate_key_while_in_flight_is_not_stored_twice(q: impl Queue) {
    let first = stored(&q, envelope("same")).await;
    q.lease(1, LEASE, at(0)).await.unwrap();
    assert_eq!(
        q.enqueue(envelope("same")).await.unwrap(),
        Enqueued::Duplicate(first)
    );
    let d = q.depth().await.unwrap();
    assert_eq!((d.pending, d.in_flight), (0, 1));
}

pub async fn retry_later_defers_and_keeps_attempts(q: impl Queue) {
    let id = stored(&q, envelope("a")).await;
    let token = q.lease(1, LEASE, at(0)).await.unwrap()[0].token;
    q.retry_later(token, at(100)).await.unwrap();
    assert_eq!(q.depth().await.unwrap().pending, 1);
    assert!(q.lease(1, LEASE, at(99)).await.unwrap().is_empty());
    let l = q.lease(1, LEASE, at(100)).await.unwrap();
    assert_eq!(ids(&l), vec![id]);
    assert_eq!(l[0].envelope.attempts, 2);
    assert_eq!(l[0].envelope.not_before, at(100));
    // Still de-duplicated while waiting for its retry.
    q.retry_later(l[0].token, at(200)).await.unwrap();
    assert_eq!(
        q.enqueue(envelope("a")).await.unwrap(),
        Enqueued::Duplicate(id)
    );
}

pub async fn release_defers_without_counting_the_delivery(q: impl Queue) {
    let id = stored(&q, envelope("a")).await;
    let first = q.lease(1, LEASE, at(0)).await.unwrap()[0].token;
    // Three deliveries that never reached the destination (say, an open breaker).
    let mut token = first;
    for round in 1..=3u64 {
        q.release(token, at(10 * round)).await.unwrap();
        assert_eq!(q.depth().await.unwrap().pending, 1);
        assert!(
            q.lease(1, LEASE, at(10 * round - 1))
                .await
                .unwrap()
                .is_empty()
        );
        let l = q.lease(1, LEASE, at(10 * round)).await.unwrap();
        assert_eq!(ids(&l), vec![id]);
        assert_eq!(
            l[0].envelope.attempts, 1,
            "a released delivery is not counted"
        );
        assert_ne!(l[0].token, token, "every lease has a token of its own");
        token = l[0].token;
    }
    // The released leases' tokens are stale.
    assert!(matches!(q.ack(&[first]).await, Err(QueueError::LeaseLost(t)) if t == first));
    assert!(matches!(
        q.release(first, at(99)).await,
        Err(QueueError::LeaseLost(_))
    ));
    // Still de-duplicated, and counted again once a delivery is.
    assert_eq!(
        q.enqueue(envelope("a")).await.unwrap(),
        Enqueued::Duplicate(id)
    );
    q.retry_later(token, at(50)).await.unwrap();
    let l = q.lease(1, LEASE, at(50)).await.unwrap();
    assert_eq!(l[0].envelope.attempts, 2);
    q.ack(&[l[0].token]).await.unwrap();
    assert_eq!(q.depth().await.unwrap().pending, 0);
}

/// A message larger than the queue's limit (`limit` bytes encoded) is refused before
/// it is sent, as `Backend`, and the connection every other call shares goes on: a
/// lease held meanwhile is still acked. (Sent, a broker closes the connection or
/// channel.)
#[cfg(any(feature = "redis", feature = "amqp"))]
pub async fn a_message_over_the_size_limit_is_refused(q: impl Queue, limit: usize) {
    q.enqueue(envelope("small")).await.unwrap();
    let held = q.lease(1, LEASE, at(0)).await.unwrap();
    assert_eq!(held.len(), 1);
    let mut big = envelope("big");
    big.body = Bytes::from(vec![b'x'; 2 * limit]);
    let refused = q.enqueue(big).await;
    assert!(
        matches!(&refused, Err(QueueError::Backend(e)) if e.to_string().contains(&format!("at most {limit}"))),
        "{refused:?}"
    );
    q.ack(&[held[0].token]).await.unwrap();
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.pending, depth.in_flight), (0, 0));
}

pub async fn dead_letter_moves_message_and_frees_key(q: impl Queue) {
    let id = stored(&q, envelope("a")).await;
    let token = q.lease(1, LEASE, at(0)).await.unwrap()[0].token;
    // A reason that is not printable ASCII (an error's text, a `Duration` in µs) comes
    // back as it was: NATS headers carry no line break.
    let reason = "400 Bad Request: délai 500µs\n100% refusé";
    q.dead_letter(token, reason).await.unwrap();
    assert_eq!(
        q.depth().await.unwrap(),
        postbox::queue::Depth {
            pending: 0,
            in_flight: 0,
            dead: 1
        }
    );
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id, id);
    // "All of them" is a valid count.
    assert_eq!(q.dead_letters(usize::MAX).await.unwrap().len(), 1);
    assert_eq!(dead[0].envelope.attempts, 1);
    assert_eq!(dead[0].reason, reason);
    // Never leased again, even long after.
    assert!(q.lease(10, LEASE, at(3600)).await.unwrap().is_empty());
    // The key is free: a new request with it is a new message.
    assert_ne!(stored(&q, envelope("a")).await, id);
    // Dead letters stay (inspection does not remove them).
    assert_eq!(q.dead_letters(10).await.unwrap().len(), 1);
}

/// Enqueues one message per key, leases them and dead-letters each (in id order, so
/// every backend lists them in this order). Returns their ids.
async fn dead_lettered(q: &impl Queue, keys: &[&str]) -> Vec<MessageId> {
    let mut sent = Vec::new();
    for key in keys {
        sent.push(stored(q, envelope(key)).await);
    }
    let leased = q.lease(keys.len(), LEASE, at(0)).await.unwrap();
    assert_eq!(ids(&leased), sent);
    for l in leased {
        q.dead_letter(l.token, "503 Service Unavailable")
            .await
            .unwrap();
    }
    sent
}

fn dead_ids(dead: &[postbox::queue::DeadLetter]) -> Vec<MessageId> {
    dead.iter().map(|d| d.envelope.id).collect()
}

pub async fn redrive_moves_dead_letters_back_as_fresh_copies(q: impl Queue) {
    let old = dead_lettered(&q, &["a", "b"]).await;
    assert_eq!(q.redrive_dead_letters(10).await.unwrap(), 2);
    assert_eq!(
        q.depth().await.unwrap(),
        postbox::queue::Depth {
            pending: 2,
            in_flight: 0,
            dead: 0
        }
    );
    assert!(q.dead_letters(10).await.unwrap().is_empty());
    let leased = q.lease(10, LEASE, at(60)).await.unwrap();
    let keys: Vec<_> = leased
        .iter()
        .map(|l| l.envelope.idempotency_key.as_str())
        .collect();
    assert_eq!(keys, ["a", "b"], "same keys, in their old order");
    for (l, old) in leased.iter().zip(&old) {
        assert_ne!(l.envelope.id, *old, "a copy has a new id");
        assert_eq!(l.envelope.attempts, 1, "attempts start again");
        assert_eq!(
            l.envelope.body,
            Bytes::from(format!("body of {}", l.envelope.idempotency_key))
        );
        assert_eq!(l.envelope.uri, "https://api/orders");
    }
    q.ack(&leased.iter().map(|l| l.token).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(q.depth().await.unwrap(), Default::default());
}

pub async fn redrive_moves_the_oldest_dead_letters_up_to_max(q: impl Queue) {
    let old = dead_lettered(&q, &["a", "b", "c"]).await;
    assert_eq!(q.redrive_dead_letters(2).await.unwrap(), 2);
    assert_eq!(dead_ids(&q.dead_letters(10).await.unwrap()), [old[2]]);
    let keys: Vec<_> = q
        .lease(10, LEASE, at(60))
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.envelope.idempotency_key)
        .collect();
    assert_eq!(keys, ["a", "b"]);
    assert_eq!(q.redrive_dead_letters(0).await.unwrap(), 0);
    assert_eq!(q.depth().await.unwrap().dead, 1);
}

/// The live message with the key carries the effect: the dead letter's copy is not
/// stored twice, and the dead letter is gone all the same.
pub async fn a_redriven_dead_letter_whose_key_is_live_is_not_stored_twice(q: impl Queue) {
    dead_lettered(&q, &["a"]).await;
    let live = stored(&q, envelope("a")).await;
    assert_eq!(q.redrive_dead_letters(10).await.unwrap(), 1);
    assert_eq!(
        q.depth().await.unwrap(),
        postbox::queue::Depth {
            pending: 1,
            in_flight: 0,
            dead: 0
        }
    );
    assert_eq!(ids(&q.lease(10, LEASE, at(60)).await.unwrap()), [live]);
}

pub async fn discard_deletes_only_the_named_dead_letters(q: impl Queue) {
    let old = dead_lettered(&q, &["a", "b", "c"]).await;
    let never_dead = MessageId::new_v7();
    assert_eq!(
        q.discard_dead_letters(&[old[1], never_dead]).await.unwrap(),
        1
    );
    assert_eq!(
        dead_ids(&q.dead_letters(10).await.unwrap()),
        [old[0], old[2]]
    );
    assert_eq!(q.discard_dead_letters(&[old[1]]).await.unwrap(), 0, "gone");
    assert_eq!(q.discard_dead_letters(&[]).await.unwrap(), 0);
    assert_eq!(q.discard_dead_letters(&[old[2], old[0]]).await.unwrap(), 2);
    assert_eq!(q.depth().await.unwrap(), Default::default());
    assert!(q.lease(10, LEASE, at(3600)).await.unwrap().is_empty());
}

/// The brokers look ids up page by page: one behind a few pages of others is found.
pub async fn discard_finds_a_dead_letter_behind_hundreds_of_others(q: impl Queue) {
    let keys: Vec<String> = (0..600).map(|i| format!("k{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let old = dead_lettered(&q, &keys).await;
    assert_eq!(
        q.discard_dead_letters(&[old[599], old[300]]).await.unwrap(),
        2
    );
    assert_eq!(q.depth().await.unwrap().dead, 598);
    let dead = dead_ids(&q.dead_letters(1000).await.unwrap());
    assert_eq!(dead.len(), 598);
    assert!(!dead.contains(&old[599]) && !dead.contains(&old[300]));
}

/// The replayer's policy ("dead-letter after `max_attempts`") relies on `attempts`
/// counting every lease, including leases that expired.
pub async fn attempts_count_every_lease_until_dead_letter(q: impl Queue) {
    const MAX_ATTEMPTS: u32 = 3;
    let id = stored(&q, envelope("a")).await;
    let mut now = at(0);
    let mut seen = Vec::new();
    loop {
        let l = q.lease(1, LEASE, now).await.unwrap().pop().expect("due");
        seen.push(l.envelope.attempts);
        if l.envelope.attempts >= MAX_ATTEMPTS {
            q.dead_letter(l.token, "too many attempts").await.unwrap();
            break;
        }
        if l.envelope.attempts == 1 {
            q.retry_later(l.token, now + Duration::from_secs(5))
                .await
                .unwrap();
        } // else: let the lease expire
        now += LEASE + Duration::from_secs(5);
    }
    assert_eq!(seen, vec![1, 2, 3]);
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!((dead[0].envelope.id, dead[0].envelope.attempts), (id, 3));
    assert_eq!(q.depth().await.unwrap().dead, 1);
}

/// An envelope enqueued with attempts already made (e.g. re-enqueued) keeps counting.
pub async fn enqueued_attempts_are_kept(q: impl Queue) {
    let mut e = envelope("a");
    e.attempts = 5;
    stored(&q, e).await;
    let l = q.lease(1, LEASE, at(0)).await.unwrap();
    assert_eq!(l[0].envelope.attempts, 6);
    q.retry_later(l[0].token, at(1)).await.unwrap();
    let l = q.lease(1, LEASE, at(1)).await.unwrap();
    assert_eq!(l[0].envelope.attempts, 7);
}

pub async fn ack_batch_acks_every_token(q: impl Queue) {
    for i in 0..100 {
        stored(&q, envelope(&format!("k{i}"))).await;
    }
    let leased = q.lease(100, LEASE, at(0)).await.unwrap();
    let tokens: Vec<_> = leased.iter().map(|l| l.token).collect();
    q.ack(&tokens).await.unwrap();
    assert_eq!(q.depth().await.unwrap(), Default::default());
}

pub async fn ack_with_a_stale_token_acks_the_rest(q: impl Queue) {
    stored(&q, envelope("a")).await;
    stored(&q, envelope("b")).await;
    let l = q.lease(2, LEASE, at(0)).await.unwrap();
    let stale = LeaseToken {
        generation: l[0].token.generation + 7,
        ..l[0].token
    };
    let res = q.ack(&[stale, l[1].token]).await;
    assert!(matches!(res, Err(QueueError::LeaseLost(t)) if t == stale));
    let d = q.depth().await.unwrap();
    assert_eq!(
        (d.pending, d.in_flight),
        (0, 1),
        "the current token was acked"
    );
}

/// A lease given back with `retry_later` or dead-lettered is over: an ack of its token
/// is refused, naming the first such token of the batch, and the rest is acked.
pub async fn ack_names_the_first_stale_token_of_leases_settled_otherwise(q: impl Queue) {
    for key in ["a", "b", "c"] {
        stored(&q, envelope(key)).await;
    }
    let l = q.lease(3, LEASE, at(0)).await.unwrap();
    assert_eq!(l.len(), 3);
    q.retry_later(l[0].token, at(100)).await.unwrap();
    q.dead_letter(l[1].token, "gone").await.unwrap();
    let res = q.ack(&[l[2].token, l[1].token, l[0].token]).await;
    assert!(
        matches!(res, Err(QueueError::LeaseLost(t)) if t == l[1].token),
        "{res:?}"
    );
    let d = q.depth().await.unwrap();
    assert_eq!(
        (d.pending, d.in_flight, d.dead),
        (1, 0, 1),
        "the retried message waits, the dead one stays dead, the third was acked"
    );
    let again = q.lease(3, LEASE, at(100)).await.unwrap();
    assert_eq!(
        ids(&again),
        [l[0].envelope.id],
        "the retried message, once due"
    );
}

/// An empty key is never de-duplicated; a blank one is a key like any other, and the
/// ack of a keyless message frees no one's key.
pub async fn a_keyless_message_is_never_deduplicated_and_a_blank_key_is_a_key(q: impl Queue) {
    let a = stored(&q, envelope("")).await;
    let b = stored(&q, envelope("")).await;
    assert_ne!(a, b);
    let blank = stored(&q, envelope(" ")).await;
    assert_eq!(
        q.enqueue(envelope(" ")).await.unwrap(),
        Enqueued::Duplicate(blank)
    );
    let l = q.lease(10, LEASE, at(0)).await.unwrap();
    assert_eq!(ids(&l), [a, b, blank]);
    q.ack(&[l[0].token]).await.unwrap();
    assert_eq!(
        q.enqueue(envelope(" ")).await.unwrap(),
        Enqueued::Duplicate(blank),
        "the blank key is still taken"
    );
    assert_eq!(q.depth().await.unwrap().in_flight, 2);
}

pub async fn depth_counts_each_state(q: impl Queue) {
    for i in 0..5 {
        stored(&q, envelope(&format!("k{i}"))).await;
    }
    let l = q.lease(3, LEASE, at(0)).await.unwrap();
    q.dead_letter(l[0].token, "x").await.unwrap();
    q.ack(&[l[1].token]).await.unwrap();
    assert_eq!(
        q.depth().await.unwrap(),
        postbox::queue::Depth {
            pending: 2,
            in_flight: 1,
            dead: 1
        }
    );
}

pub async fn concurrent_enqueues_are_all_stored(q: impl Queue) {
    let q = std::sync::Arc::new(q);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..20 {
                ids.push(
                    q.enqueue(envelope(&format!("t{t}-{i}")))
                        .await
                        .unwrap()
                        .id(),
                );
            }
            ids
        }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.extend(t.await.unwrap());
    }
    sent.sort();
    let leased = q.lease(1000, LEASE, at(0)).await.unwrap();
    assert_eq!(ids(&leased), sent, "all stored, leased in id order");
}

pub async fn full_queue_refuses_enqueue(q: impl Queue) {
    stored(&q, envelope("a")).await;
    stored(&q, envelope("b")).await;
    assert!(matches!(
        q.enqueue(envelope("c")).await,
        Err(QueueError::Full { capacity: 2 })
    ));
    // A duplicate is still answered: it needs no room.
    assert!(matches!(
        q.enqueue(envelope("a")).await,
        Ok(Enqueued::Duplicate(_))
    ));
    // Dead letters free their room.
    let token = q.lease(1, LEASE, at(0)).await.unwrap()[0].token;
    q.dead_letter(token, "x").await.unwrap();
    stored(&q, envelope("c")).await;
}

/// The `Replayer` on this backend, in real time: every message reaches a server behind
/// the `Idempotency` layer and takes effect once, although the first response to one of
/// them is lost (so it is replayed again); all are acked, none dead-lettered.
#[cfg(feature = "http")]
pub async fn replayer_delivers_every_message_once_through_an_idempotent_server(
    q: impl Queue + 'static,
) {
    use http_body_util::Full;
    use postbox::BoxError;
    use postbox::enqueue::{BufferedBody, IDEMPOTENCY_KEY_HEADER, Replayer};
    use postbox::idempotency::{FingerprintedBody, IdempotencyLayer};
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};
    use tower::{Layer, ServiceExt, service_fn};
    type Req = http::Request<BufferedBody<Full<Bytes>>>;
    fn key_of<B>(req: &http::Request<B>) -> String {
        req.headers()[IDEMPOTENCY_KEY_HEADER]
            .to_str()
            .unwrap()
            .to_owned()
    }

    let q = Arc::new(q);
    let due = SystemTime::now() - Duration::from_secs(1);
    for i in 0..10 {
        let mut e = envelope(&format!("replay-{i}"));
        e.created_at = due;
        e.not_before = due;
        assert!(matches!(q.enqueue(e).await.unwrap(), Enqueued::Stored(_)));
    }
    let applied: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let handler = service_fn({
        let applied = applied.clone();
        move |req: http::Request<FingerprintedBody<BufferedBody<Full<Bytes>>>>| {
            *applied.lock().unwrap().entry(key_of(&req)).or_default() += 1;
            async { Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from("applied")))) }
        }
    });
    let server = IdempotencyLayer::new(100).layer(handler);
    // The first response to `replay-3` is lost after the server applied it.
    let lost = Arc::new(Mutex::new(HashSet::new()));
    let network = service_fn(move |req: Req| {
        let (server, lost) = (server.clone(), lost.clone());
        async move {
            let key = key_of(&req);
            let res = server.oneshot(req).await?;
            if key == "replay-3" && lost.lock().unwrap().insert(key) {
                return Err(BoxError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                )));
            }
            Ok(res)
        }
    });
    let handle = Replayer::http(q.clone(), network)
        .jitter(false)
        .backoff(Duration::from_millis(100), Duration::from_secs(1))
        .poll_interval(Duration::from_millis(50))
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while handle.stats().replayed < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            handle.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = handle.shutdown().await;
    assert_eq!((stats.retried, stats.dead_lettered), (1, 0), "{stats:?}");
    let applied = applied.lock().unwrap().clone();
    assert_eq!(applied.len(), 10, "{applied:?}");
    assert!(applied.values().all(|&n| n == 1), "{applied:?}");
    let depth = q.depth().await.unwrap();
    assert_eq!((depth.pending, depth.in_flight, depth.dead), (0, 0, 0));
}

pub async fn a_redrive_into_a_full_queue_moves_what_fits_and_keeps_the_rest_dead(q: impl Queue) {
    let old = dead_lettered(&q, &["a", "b"]).await;
    let c = dead_lettered(&q, &["c"]).await[0];
    stored(&q, envelope("d")).await;
    assert!(matches!(
        q.redrive_dead_letters(10).await,
        Err(QueueError::Full { capacity: 2 })
    ));
    assert_eq!(
        dead_ids(&q.dead_letters(10).await.unwrap()),
        [old[1], c],
        "the first was moved, the rest stay dead"
    );
    assert_eq!(q.depth().await.unwrap().pending, 2);
}
