//! Response futures for [`AttemptTimeout`](super::AttemptTimeout) and
//! [`Deadline`](super::Deadline).

use super::error::{DeadlineExceeded, Elapsed};
use crate::BoxError;
#[cfg(feature = "grpc")]
use crate::error::is_caused_by;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep, sleep_until};

pin_project! {
    /// Response future of [`AttemptTimeout`](super::AttemptTimeout).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: Timed<F>,
        // The call's deadline comes before the attempt's end: expiry is the call's
        // `DeadlineExceeded`, not the attempt's `Elapsed`.
        call_bound: bool,
    }
}

pin_project! {
    /// Response future of [`Deadline`](super::Deadline).
    #[derive(Debug)]
    pub struct DeadlineFuture<F> {
        #[pin]
        state: Timed<F>,
    }
}

pin_project! {
    #[project = TimedProj]
    #[project_replace = TimedReplace]
    #[derive(Debug)]
    enum Timed<F> {
        Running {
            #[pin]
            inner: F,
            // Armed only once the inner future is pending: a call that completes on its
            // first poll never touches the clock or the timer wheel.
            #[pin]
            sleep: Option<Sleep>,
            deadline: Option<Instant>,
            budget: Duration,
        },
        Expired { error: Option<DeadlineExceeded> },
        Done,
    }
}

impl<F> Timed<F> {
    fn running(inner: F, deadline: Option<Instant>, budget: Duration) -> Self {
        Timed::Running {
            inner,
            sleep: None,
            deadline,
            budget,
        }
    }

    /// The error of a future that failed before any call, once; `None` otherwise.
    fn take_expired(self: Pin<&mut Self>) -> Option<DeadlineExceeded> {
        match self.project() {
            TimedProj::Expired { error } => Some(
                error
                    .take()
                    .expect("timeout future polled after completion"),
            ),
            _ => None,
        }
    }

    /// Polls the inner future, then the (lazily armed) timer. On expiry the inner
    /// future is dropped at once and the budget is returned.
    fn poll_timed<T, E>(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended<T, E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let budget = match self.as_mut().project() {
            TimedProj::Running {
                inner,
                sleep: mut timer,
                deadline,
                budget,
            } => {
                if let Poll::Ready(out) = inner.poll(cx) {
                    // An error once the end has come: perhaps the inner service's own
                    // timer for the same end (a tonic `Channel` enforces the
                    // `grpc-timeout` this layer sent), woken in the same tick and
                    // polled first, or up to a millisecond early: from 100 s on, the
                    // header is in milliseconds, rounded down (see
                    // `Ended::into_result`).
                    let ended = match out {
                        Err(e)
                            if cfg!(feature = "grpc")
                                && timer.as_ref().get_ref().as_ref().is_some_and(|t| {
                                    t.deadline().saturating_duration_since(Instant::now())
                                        <= GRPC_TIMEOUT_ROUNDING
                                }) =>
                        {
                            Ended::ErrAtEnd(e, *budget)
                        }
                        out => Ended::Out(out),
                    };
                    self.set(Timed::Done);
                    return Poll::Ready(ended);
                }
                if timer.is_none() {
                    let at =
                        deadline.unwrap_or_else(|| crate::clock::later(Instant::now(), *budget));
                    timer.set(Some(sleep_until(at)));
                }
                if let Some(timer) = timer.as_pin_mut() {
                    ready!(timer.poll(cx));
                }
                *budget
            }
            TimedProj::Expired { .. } | TimedProj::Done => {
                panic!("timeout future polled after completion")
            }
        };
        // Drop the inner future now: expiry cancels the attempt.
        self.project_replace(Timed::Done);
        Poll::Ready(Ended::Expired(budget))
    }
}

/// How a timed future ended.
enum Ended<T, E> {
    /// The inner future's output, before the end.
    Out(Result<T, E>),
    /// The inner future failed once the end had come (with the budget).
    ErrAtEnd(E, Duration),
    /// The end came first (with the budget); the inner future is dropped.
    Expired(Duration),
}

/// The most an encoded `grpc-timeout` is short of the time it stands for, below 27
/// hours (8 digits of milliseconds): an inner tonic timeout this close to our end is
/// ours.
const GRPC_TIMEOUT_ROUNDING: Duration = Duration::from_millis(1);

impl<T, E: Into<BoxError>> Ended<T, E> {
    /// The output, or the budget if the call counts as expired: the end came first, or
    /// the inner future failed at the end with the timeout of a tonic `Channel`
    /// enforcing the `grpc-timeout` this layer sent (tonic reports it as
    /// `CANCELLED`). Any other error at the end is passed on: it may say more (a
    /// connection never made, an inner layer's own timeout).
    fn into_result(self) -> Result<Result<T, BoxError>, Duration> {
        match self {
            Ended::Out(out) => Ok(out.map_err(Into::into)),
            Ended::ErrAtEnd(e, budget) => {
                let e = e.into();
                #[cfg(feature = "grpc")]
                if is_caused_by::<tonic::TimeoutExpired>(&*e) {
                    return Err(budget);
                }
                #[cfg(not(feature = "grpc"))]
                let _ = budget;
                Ok(Err(e))
            }
            Ended::Expired(budget) => Err(budget),
        }
    }
}

// === impl ResponseFuture ===

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, timeout: Duration) -> Self {
        Self {
            state: Timed::running(inner, None, timeout),
            call_bound: false,
        }
    }

    /// Times out at `at` (the clock was read at call time), reporting `timeout`; as the
    /// call's deadline if `call_bound` (it came before the attempt's own end).
    pub(crate) fn until(inner: F, at: Instant, timeout: Duration, call_bound: bool) -> Self {
        Self {
            state: Timed::running(inner, Some(at), timeout),
            call_bound,
        }
    }

    /// Fails with `error` without an attempt (the call's deadline had passed).
    pub(crate) fn expired(error: DeadlineExceeded) -> Self {
        Self {
            state: Timed::Expired { error: Some(error) },
            call_bound: true,
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut state = this.state;
        if let Some(e) = state.as_mut().take_expired() {
            return Poll::Ready(Err(e.into()));
        }
        match ready!(state.poll_timed(cx)).into_result() {
            Ok(out) => Poll::Ready(out),
            Err(after) if *this.call_bound => {
                tracing::debug!(?after, "call deadline passed during the attempt");
                metrics::counter!("postbox_calls_total", "layer" => "attempt_timeout", "outcome" => "deadline_exceeded")
                    .increment(1);
                Poll::Ready(Err(DeadlineExceeded::new(after, false).into()))
            }
            Err(after) => {
                tracing::debug!(?after, "attempt timed out");
                metrics::counter!("postbox_calls_total", "layer" => "attempt_timeout", "outcome" => "timeout")
                    .increment(1);
                Poll::Ready(Err(Elapsed::new(after).into()))
            }
        }
    }
}

// === impl DeadlineFuture ===

impl<F> DeadlineFuture<F> {
    pub(crate) fn running(inner: F, deadline: Option<Instant>, budget: Duration) -> Self {
        Self {
            state: Timed::running(inner, deadline, budget),
        }
    }

    pub(crate) fn expired(error: DeadlineExceeded) -> Self {
        Self {
            state: Timed::Expired { error: Some(error) },
        }
    }
}

impl<F, T, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        if let Some(e) = state.as_mut().take_expired() {
            return Poll::Ready(Err(e.into()));
        }
        match ready!(state.poll_timed(cx)).into_result() {
            Ok(out) => Poll::Ready(out),
            Err(budget) => {
                tracing::debug!(?budget, "deadline exceeded");
                metrics::counter!(
                    "postbox_calls_total",
                    "layer" => "deadline",
                    "outcome" => "deadline_exceeded",
                    "when" => "in_flight"
                )
                .increment(1);
                Poll::Ready(Err(DeadlineExceeded::new(budget, false).into()))
            }
        }
    }
}
