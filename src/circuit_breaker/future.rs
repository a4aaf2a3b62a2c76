//! Response future of [`CircuitBreaker`](super::CircuitBreaker) and
//! [`KeyedCircuitBreaker`](super::KeyedCircuitBreaker).

use super::error::{Error, Open};
use super::shared::Ref;
use super::state::{Now, Permit, Verdict};
use crate::classify::{Classification, Classify};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker): records the
    /// classified outcome when the inner future completes.
    ///
    /// # Cancel safety
    /// Dropping it (or a panic inside the inner future) records nothing, unless the
    /// breaker counts dropped calls ([`count_dropped`](super::CircuitBreakerBuilder::count_dropped)):
    /// then it records a failure. A half-open probe's slot is given back so another
    /// call can probe.
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F, C>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, C> {
        Running {
            #[pin]
            inner: F,
            guard: Guard,
            classifier: C,
        },
        Rejected { error: Option<Open> },
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Running { .. } => "running",
            Kind::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn running(inner: F, guard: Guard, classifier: C) -> Self {
        Self {
            kind: Kind::Running {
                inner,
                guard,
                classifier,
            },
        }
    }

    pub(crate) fn rejected(error: Open) -> Self {
        Self {
            kind: Kind::Rejected { error: Some(error) },
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: Classify<T, E>,
{
    type Output = Result<T, Error<E>>;

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Running {
                inner,
                guard,
                classifier,
            } => {
                let out = ready!(inner.poll(cx));
                {
                    if guard.permit.is_tracked() {
                        guard.complete(verdict(classifier.classify(out.as_ref())));
                    }
                }
                Poll::Ready(out.map_err(Error::Inner))
            }
            KindProj::Rejected { error } => Poll::Ready(Err(Error::Open(
                error
                    .take()
                    .expect("circuit breaker future polled after completion"),
            ))),
        }
    }
}

#[inline]
fn verdict(c: Classification) -> Verdict {
    if c.is_ignored() {
        Verdict::Ignored
    } else if c.is_failure() {
        Verdict::Failure
    } else {
        Verdict::Success
    }
}

// === impl Guard ===

/// An admitted call: records its outcome, or gives a probe slot back when dropped.
pub(crate) struct Guard {
    breaker: Arc<Ref>,
    permit: Permit,
}

impl Guard {
    pub(crate) fn new(breaker: Arc<Ref>, permit: Permit) -> Self {
        Self { breaker, permit }
    }

    /// Records the outcome (once; the permit is then used up).
    #[inline]
    fn complete(&mut self, verdict: Verdict) {
        let p = self.permit.take();
        self.breaker.complete(p, verdict, &mut Now::lazy());
    }
}

impl Drop for Guard {
    #[inline]
    fn drop(&mut self) {
        // A no-op unless the call is unfinished.
        self.breaker.drop_unfinished(self.permit);
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("permit", &self.permit)
            .finish()
    }
}
