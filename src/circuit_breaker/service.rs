use super::error::{Error, Open};
use super::future::{Guard, ResponseFuture};
use super::handle::CircuitBreakerHandle;
use super::shared::Shared;
use super::state::{Now, Permit};
use crate::classify::{Classify, ErrorClassifier};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower_service::Service;

/// The breaker and this service's reservation (a permit from `poll_ready`, or its
/// rejection). Dropping it gives back a reserved probe slot.
struct Slot {
    breaker: Arc<Shared>,
    reserved: Permit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.breaker.breaker().release(self.reserved.take());
    }
}

/// Stops calling a failing dependency; see the [module docs](super).
///
/// Admission is decided in `poll_ready` (fail fast: a rejected call is a *ready*
/// service whose `call` fails at once with [`Open`](super::error::Open), never an
/// error from `poll_ready`, and the inner service is not polled). An admitted call's
/// permit moves into the response future. Errors are [`Error`]: the rejection or the
/// inner error, unboxed (a rejection allocates nothing); `.into()` makes a
/// [`BoxError`](crate::BoxError).
///
/// # Cancel safety
/// Dropping the response future records nothing (a failure with
/// [`count_dropped`](super::CircuitBreakerBuilder::count_dropped)) and gives back a
/// half-open probe slot. A half-open probe slot reserved by `poll_ready` is held until `call` (or until
/// the service is dropped), also while the inner service is not ready. An admission
/// made while the inner service was not ready is decided again when `poll_ready` is
/// called next if the breaker changed state meanwhile: a call waiting for a bulkhead
/// inside does not go through after the breaker opened. The inner service keeps what
/// its readiness reserved then (a bulkhead's place in line, or its permit) until its
/// next call or until it is dropped: it cannot be un-readied without a clone.
/// [`KeyedCircuitBreaker`](super::KeyedCircuitBreaker), which clones its inner service
/// for this, gives it back at once; with this breaker, clone the stack per call (as a
/// retry layer or a router does) where that matters.
///
/// # Clone
/// A clone shares the breaker but not an admission made by `poll_ready`: it starts
/// unadmitted (a reserved probe slot stays with the original).
pub struct CircuitBreaker<S, C = ErrorClassifier> {
    inner: S,
    slot: Slot,
    classifier: C,
}

// === impl CircuitBreaker ===

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn new(inner: S, breaker: Arc<Shared>, classifier: C) -> Self {
        Self {
            inner,
            slot: Slot {
                breaker,
                reserved: Permit::EMPTY,
            },
            classifier,
        }
    }

    /// A handle to observe and control the breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle::new(self.slot.breaker.breaker().clone())
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the breaker, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C: Clone> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        Self::new(
            self.inner.clone(),
            self.slot.breaker.clone(),
            self.classifier.clone(),
        )
    }
}

impl<S: fmt::Debug, C: fmt::Debug> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("breaker", self.slot.breaker.breaker())
            .field("classifier", &self.classifier)
            .field("reserved", &self.slot.reserved)
            .finish()
    }
}

impl<S, C> CircuitBreaker<S, C> {
    /// The rejection `call` answers for one `poll_ready` rejected, as the breaker stands
    /// now: a caller that did other work in between (`tower::steer`, a balancer) may
    /// find it closed by hand or its break over. Admitted now, the call is still not
    /// made (the inner service was never polled ready): a non-forced rejection with
    /// no wait, so a retry polls again at once. (The stale one was returned: a forced
    /// rejection, never retried, from a closed breaker, or the whole break to wait.)
    #[cold]
    #[inline(never)]
    fn rejection_now(&self) -> Open {
        let breaker = self.slot.breaker.breaker();
        breaker.count_rejection();
        match breaker.admit(&mut Now::lazy().deferring_start()) {
            Ok(permit) => {
                breaker.release(permit);
                Open::new(Duration::ZERO)
            }
            Err(open) => open,
        }
    }
}

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = Error<S::Error>;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let slot = &mut self.slot;
        if slot.reserved.rejection().is_some() {
            // A rejection is never kept across polls: the break may have ended, or the
            // breaker been closed by hand, since (a balancer keeps a service "ready"
            // until it picks it). It holds nothing, and is counted only when the call
            // it turns away is made.
            slot.reserved = Permit::EMPTY;
        } else if !slot.reserved.is_empty() && !slot.breaker.breaker().is_current(&slot.reserved) {
            // Admitted while the inner service was not ready, before a transition (the
            // breaker tripped, or was forced open, while this call waited for a
            // bulkhead inside): admission is decided again, by the current state.
            slot.breaker.breaker().release(slot.reserved.take());
        }
        if slot.reserved.is_empty() {
            slot.reserved = match slot
                .breaker
                .breaker()
                .admit(&mut Now::lazy().deferring_start())
            {
                Ok(permit) => permit,
                Err(open) => Permit::rejected(&open),
            };
        }
        if slot.reserved.rejection().is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(e)) => {
                // The service failed: give back what was reserved.
                slot.breaker.breaker().release(slot.reserved.take());
                Poll::Ready(Err(Error::Inner(e)))
            }
            other => other.map_err(Error::Inner),
        }
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let mut permit = self.slot.reserved.take();
        if permit.rejection().is_some() {
            return ResponseFuture::rejected(self.rejection_now());
        }
        assert!(
            !permit.is_empty(),
            "CircuitBreaker::call called before poll_ready returned Ready"
        );
        let breaker = self.slot.breaker.breaker();
        if !breaker.is_current(&permit) {
            // A transition since `poll_ready` (the breaker tripped, or was forced open
            // or reset, while the caller did other work between readiness and the
            // call): admission is decided again, by the current state.
            breaker.release(permit);
            permit = match breaker.admit(&mut Now::lazy().deferring_start()) {
                Ok(permit) => permit,
                Err(open) => {
                    breaker.count_rejection();
                    return ResponseFuture::rejected(open);
                }
            };
        }
        self.slot.breaker.breaker().start_call(&mut permit);
        let guard = Guard::new(self.slot.breaker.local().clone(), permit);
        ResponseFuture::running(self.inner.call(req), guard, self.classifier.clone())
    }
}
