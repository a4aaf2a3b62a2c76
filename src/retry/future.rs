//! Response future of [`Retry`](super::Retry).

use super::policy::{CloneRequest, OnRetry, RetryEvent, RetryPolicy, ceil_millis};
use crate::classify::{Classification, Classify};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

pin_project! {
    /// Response future of [`Retry`](super::Retry): runs the attempts, sleeping between
    /// them, and resolves to the last attempt's outcome.
    ///
    /// It owns a clone of the inner service (the one that was ready when `call` was
    /// made) and polls its readiness again before every retry.
    ///
    /// # Cancel safety
    /// Dropping it drops the attempt in flight or the pending sleep; nothing else runs.
    pub struct ResponseFuture<S, Req, P>
    where
        S: Service<Req>,
    {
        request: Option<Req>,
        service: S,
        policy: P,
        // Attempts made so far (the one in flight included).
        attempt: u32,
        retry_safe: bool,
        prev_delay: Duration,
        #[pin]
        state: State<S::Future, Result<S::Response, S::Error>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, O> {
        // An attempt is in flight, in its `debug` span `retry_attempt{attempt}` (the
        // inner layers' events nest under it); disabled unless a subscriber wants it.
        Called { #[pin] future: F, span: tracing::Span },
        // Backing off before the next attempt. With a deadline, `last` keeps the last
        // outcome, returned if the deadline has passed when the backoff is over.
        // Boxed: a retry allocates once, and the happy path's future stays small.
        Waiting { sleep: Pin<Box<Sleep>>, last: Option<O> },
        // Waiting for the service to be ready for the next attempt, in that attempt's
        // span (a breaker going half-open, a full bulkhead, log under it).
        Polling { last: Option<O>, span: tracing::Span },
    }
}

/// Why the layer stopped retrying a retryable outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GiveUp {
    Exhausted,
    NotReplayable,
    NotRetrySafe,
    HintTooLong(Duration),
    OpenTooLong(Duration),
    Deadline,
    Budget,
}

impl GiveUp {
    const fn as_str(self) -> &'static str {
        match self {
            GiveUp::Exhausted => "max_retries",
            GiveUp::NotReplayable => "not_replayable",
            GiveUp::NotRetrySafe => "not_retry_safe",
            GiveUp::HintTooLong(_) => "retry_after_too_long",
            GiveUp::OpenTooLong(_) => "circuit_open",
            GiveUp::Deadline => "deadline",
            GiveUp::Budget => "budget_exhausted",
        }
    }
}

impl<S, Req, P> ResponseFuture<S, Req, P>
where
    S: Service<Req>,
{
    pub(crate) fn new(
        request: Option<Req>,
        service: S,
        policy: P,
        retry_safe: bool,
        future: S::Future,
        span: tracing::Span,
    ) -> Self {
        Self {
            request,
            service,
            policy,
            attempt: 1,
            retry_safe,
            prev_delay: Duration::ZERO,
            state: State::Called { future, span },
        }
    }
}

impl<S, Req, P> fmt::Debug for ResponseFuture<S, Req, P>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Called { .. } => "called",
            State::Waiting { .. } => "waiting",
            State::Polling { .. } => "polling_ready",
        };
        f.debug_struct("ResponseFuture")
            .field("attempt", &self.attempt)
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<S, Req, C, R, H> Future for ResponseFuture<S, Req, RetryPolicy<C, R, H>>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error>,
    R: CloneRequest<Req>,
    H: OnRetry,
{
    type Output = Result<S::Response, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future, span } => {
                    let out = {
                        let _entered = span.enter();
                        ready!(future.poll(cx))
                    };
                    let class = this.policy.classifier.classify(out.as_ref());
                    if !class.is_retryable() {
                        if *this.attempt > 1 {
                            finished(*this.attempt, &class);
                        }
                        return Poll::Ready(out);
                    }
                    let deadline = this
                        .request
                        .as_ref()
                        .and_then(|r| this.policy.requests.deadline(r));
                    let Some(delay) = retry_delay(
                        &*this.policy,
                        *this.attempt,
                        this.request.is_some(),
                        *this.retry_safe,
                        *this.prev_delay,
                        deadline,
                        &class,
                    ) else {
                        return Poll::Ready(out);
                    };
                    if let Some(original) = this.request.as_ref() {
                        this.policy.requests.after_attempt(original, &class);
                    }
                    crate::retry::AttemptLog::note_in_task(&class);
                    // Kept only while a deadline may pass before the retry is sent.
                    let last = deadline.map(|_| out);
                    *this.prev_delay = delay;
                    if delay.is_zero() {
                        let span = attempt_span(this.attempt.saturating_add(1));
                        this.state.set(State::Polling { last, span });
                    } else {
                        this.state.set(State::Waiting {
                            sleep: Box::pin(tokio::time::sleep(delay)),
                            last,
                        });
                    }
                }
                StateProj::Waiting { sleep, last } => {
                    ready!(sleep.as_mut().poll(cx));
                    let last = last.take();
                    let span = attempt_span(this.attempt.saturating_add(1));
                    this.state.set(State::Polling { last, span });
                }
                StateProj::Polling { last, span } => {
                    // Each retry spends a unit of the task's Tokio budget, so a chain of
                    // attempts failing at once with no backoff between them (a zero
                    // delay, a full bulkhead's rejection) yields to the scheduler now
                    // and then instead of holding the thread for the whole chain.
                    ready!(tokio::task::coop::poll_proceed(cx)).made_progress();
                    // The backoff is over but the call's deadline has passed already
                    // (the task was polled late, or on the deadline's own tick): the
                    // retry is not sent; the last outcome is returned, as when the
                    // backoff alone would pass the deadline.
                    if last.is_some()
                        && this
                            .request
                            .as_ref()
                            .and_then(|r| this.policy.requests.deadline(r))
                            .is_some_and(|at| Instant::now() >= at)
                    {
                        let out = last.take().expect("checked above");
                        give_up(
                            *this.attempt,
                            GiveUp::Deadline,
                            &this.policy.classifier.classify(out.as_ref()),
                        );
                        return Poll::Ready(out);
                    }
                    // Not held while the service readies: it may be waiting for the
                    // last response (a connection its unread body keeps busy).
                    *last = None;
                    if let Err(e) = ready!(span.in_scope(|| this.service.poll_ready(cx))) {
                        return Poll::Ready(Err(e));
                    }
                    *this.attempt = this.attempt.saturating_add(1);
                    let last = *this.attempt > this.policy.max_retries;
                    let req = if last {
                        this.request.take()
                    } else {
                        let original = this
                            .request
                            .as_ref()
                            .expect("a retry is decided only with a request");
                        match this.policy.requests.clone_request(original) {
                            Some(copy) => Some(copy),
                            None => this.request.take(),
                        }
                    };
                    let mut req = req.expect("a retry is decided only with a request");
                    this.policy.requests.before_retry(&mut req);
                    count_retry_attempt();
                    let span = std::mem::replace(span, tracing::Span::none());
                    let future = {
                        let _entered = span.enter();
                        this.service.call(req)
                    };
                    this.state.set(State::Called { future, span });
                }
            }
        }
    }
}

/// The slow path after a retryable outcome: the delay before the next attempt (after
/// telling the hook, `tracing` and `metrics`), or `None` to return the outcome (after
/// `give_up`'s event). Kept out of line so the happy path of `poll` stays small enough to inline.
#[cold]
#[inline(never)]
fn retry_delay<C, R, H: OnRetry>(
    policy: &RetryPolicy<C, R, H>,
    attempt: u32,
    have_request: bool,
    retry_safe: bool,
    prev_delay: Duration,
    deadline: Option<Instant>,
    class: &Classification,
) -> Option<Duration> {
    let delay = match decide(
        policy,
        attempt,
        have_request,
        retry_safe,
        prev_delay,
        deadline,
        class,
    ) {
        Ok(delay) => delay,
        Err(why) => {
            // Retries switched off (`max_retries(0)`): returning the failure is what was
            // asked for, not worth a `warn` and a count per call.
            if policy.max_retries > 0 {
                give_up(attempt, why, class);
            }
            return None;
        }
    };
    let event = RetryEvent {
        attempt: attempt.saturating_add(1),
        delay,
        reason: *class,
    };
    tracing::debug!(
        failed_attempt = attempt,
        next_attempt = event.attempt,
        ?delay,
        class = ?class.class(),
        retry_after = ?class.retry_after(),
        "attempt failed; retrying"
    );
    metrics::counter!("postbox_retries_total").increment(1);
    policy.on_retry.on_retry(&event);
    Some(delay)
}

/// A retried call ended with an outcome that is not retried (a success, or a failure
/// for good).
#[cold]
#[inline(never)]
fn finished(attempts: u32, class: &Classification) {
    tracing::debug!(attempts, class = ?class.class(), "retried call finished");
}

/// The `debug` span of attempt number `attempt` (attempt 2 is the first retry).
#[cold]
#[inline(never)]
fn attempt_span(attempt: u32) -> tracing::Span {
    tracing::debug_span!("retry_attempt", attempt)
}

#[cold]
#[inline(never)]
fn count_retry_attempt() {
    metrics::counter!("postbox_retry_attempts_total").increment(1);
}

/// The delay before the next attempt, or why there is none. Pure apart from the jitter
/// draw and the budget withdrawal (the last step, so a refused retry costs nothing).
fn decide<C, R, H>(
    policy: &RetryPolicy<C, R, H>,
    attempt: u32,
    have_request: bool,
    retry_safe: bool,
    prev_delay: Duration,
    deadline: Option<Instant>,
    class: &Classification,
) -> Result<Duration, GiveUp> {
    let retries_done = attempt - 1;
    if retries_done >= policy.max_retries {
        return Err(GiveUp::Exhausted);
    }
    if !have_request {
        return Err(GiveUp::NotReplayable);
    }
    if class.may_have_taken_effect() && !retry_safe {
        return Err(GiveUp::NotRetrySafe);
    }
    let unit = match policy.backoff.jitter() {
        super::backoff::Jitter::None => 0.0,
        _ => policy.rng.next_unit(),
    };
    let mut delay = policy.backoff.delay(retries_done + 1, prev_delay, unit);
    if let Some(hint) = class.retry_after() {
        // Never early: round up to tokio's millisecond resolution.
        let hint = ceil_millis(hint);
        // Our own rejection (an open breaker inside) has a bound of its own: waiting out
        // a break blocks the caller for it, the pile-up a breaker is there to stop.
        let max_wait = if class.is_own_rejection() {
            if hint > policy.max_open_wait {
                return Err(GiveUp::OpenTooLong(hint));
            }
            policy.max_open_wait
        } else {
            if hint > policy.max_retry_after {
                return Err(GiveUp::HintTooLong(hint));
            }
            policy.max_retry_after
        };
        let at_least = delay.max(hint);
        // Callers told the same instant (one breaker's break, one rate-limit reset)
        // would all come back at once: a jittering policy spreads them over up to half
        // the hint more (as Envoy does), at most its backoff cap — never earlier.
        let spread = super::backoff::scale((hint / 2).min(policy.backoff.max_delay()), unit);
        // Never past the longest wait for a hint that is allowed.
        delay = at_least.max(hint.saturating_add(spread).min(max_wait));
        if let Some(deadline) = deadline
            && delay > at_least
            && !starts_before(delay, deadline)
        {
            delay = at_least; // the spread must not cost the retry
        }
    }
    // The call's deadline passes before the next attempt could start: return this
    // outcome now rather than a `DeadlineExceeded` later.
    if let Some(deadline) = deadline
        && !starts_before(delay, deadline)
    {
        return Err(GiveUp::Deadline);
    }
    // A retry after an open breaker's rejection costs nothing from the budget: the
    // attempt never reached the dependency, the retry waits for the break (within
    // `max_open_wait`), and the breaker lets only its probes through. (A full
    // bulkhead's is charged: retried without a hint, under overload, its callers would
    // pile up on the backoff.)
    if let Some(budget) = &policy.budget
        && !(class.is_own_rejection() && class.retry_after().is_some())
        && !budget.try_withdraw(Instant::now())
    {
        metrics::counter!("postbox_retry_budget_exhausted_total").increment(1);
        return Err(GiveUp::Budget);
    }
    Ok(delay)
}

/// Whether an attempt after `delay` starts before `deadline`. Tokio's timer wakes a
/// sleep at the next whole millisecond, so up to a millisecond after `delay`: a
/// retry whose delay ends just before the deadline would start just after it, and
/// come back as the deadline's error instead of this outcome.
fn starts_before(delay: Duration, deadline: Instant) -> bool {
    const TIMER_RESOLUTION: Duration = Duration::from_millis(1);
    // No delay, no sleep: the attempt starts now.
    let slack = if delay.is_zero() {
        Duration::ZERO
    } else {
        TIMER_RESOLUTION
    };
    Instant::now()
        .checked_add(delay.saturating_add(slack))
        .is_some_and(|latest| latest < deadline)
}

fn give_up(attempts: u32, why: GiveUp, class: &Classification) {
    let retry_after = match why {
        GiveUp::HintTooLong(h) | GiveUp::OpenTooLong(h) => Some(h),
        _ => class.retry_after(),
    };
    // One literal label per arm: a label that is an expression makes the macro build
    // (allocate) its label list on every call, and during an outage every call gives up.
    let counter = match why {
        GiveUp::Exhausted => {
            metrics::counter!("postbox_retry_gave_up_total", "reason" => "max_retries")
        }
        GiveUp::NotReplayable => {
            metrics::counter!("postbox_retry_gave_up_total", "reason" => "not_replayable")
        }
        GiveUp::NotRetrySafe => {
            metrics::counter!("postbox_retry_gave_up_total", "reason" => "not_retry_safe")
        }
        GiveUp::HintTooLong(_) => {
            metrics::counter!("postbox_retry_gave_up_total", "reason" => "retry_after_too_long")
        }
        GiveUp::OpenTooLong(_) => {
            metrics::counter!("postbox_retry_gave_up_total", "reason" => "circuit_open")
        }
        GiveUp::Deadline => {
            metrics::counter!("postbox_retry_gave_up_total", "reason" => "deadline")
        }
        GiveUp::Budget => {
            metrics::counter!("postbox_retry_gave_up_total", "reason" => "budget_exhausted")
        }
    };
    counter.increment(1);
    // `debug`, not `warn`: during an outage every call ends here, and the counter
    // above already says how many and why.
    tracing::debug!(
        attempts,
        reason = why.as_str(),
        class = ?class.class(),
        ?retry_after,
        "retryable failure not retried; returning the last outcome"
    );
}
