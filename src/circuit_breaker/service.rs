use super::error::Open;
use super::future::{Guard, ResponseFuture};
use super::handle::CircuitBreakerHandle;
use super::state::{Breaker, Now};
use crate::BoxError;
use crate::classify::{Classify, ErrorClassifier};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_service::Service;

enum Reserved {
    Empty,
    Admitted(Guard),
    Rejected(Open),
}

/// Stops calling a failing dependency; see the [module docs](super).
///
/// Admission is decided in `poll_ready` (fail fast: a rejected call is a *ready*
/// service whose `call` fails at once with [`Open`], never an error from `poll_ready`,
/// and the inner service is not polled). An admitted call's permit moves into the
/// response future. Errors become [`BoxError`].
///
/// # Clone
/// A clone shares the breaker but not an admission made by `poll_ready`: it starts
/// unadmitted (a reserved probe slot stays with the original).
pub struct CircuitBreaker<S, C = ErrorClassifier> {
    inner: S,
    breaker: Arc<Breaker>,
    classifier: C,
    reserved: Reserved,
}

// === impl CircuitBreaker ===

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn new(inner: S, breaker: Arc<Breaker>, classifier: C) -> Self {
        Self {
            inner,
            breaker,
            classifier,
            reserved: Reserved::Empty,
        }
    }

    /// A handle to observe and control the breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle::new(self.breaker.clone())
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
            self.breaker.clone(),
            self.classifier.clone(),
        )
    }
}

impl<S: fmt::Debug, C: fmt::Debug> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reserved = match self.reserved {
            Reserved::Empty => "empty",
            Reserved::Admitted(_) => "admitted",
            Reserved::Rejected(_) => "rejected",
        };
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("breaker", &self.breaker)
            .field("classifier", &self.classifier)
            .field("reserved", &reserved)
            .finish()
    }
}

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let Reserved::Empty = self.reserved {
            self.reserved = match self.breaker.acquire(&mut Now::lazy()) {
                Ok(permit) => Reserved::Admitted(Guard::new(self.breaker.clone(), permit)),
                Err(open) => Reserved::Rejected(open),
            };
        }
        match self.reserved {
            Reserved::Rejected(_) => Poll::Ready(Ok(())),
            _ => match self.inner.poll_ready(cx) {
                Poll::Ready(Err(e)) => {
                    // The service failed: give back what was reserved.
                    self.reserved = Reserved::Empty;
                    Poll::Ready(Err(e.into()))
                }
                other => other.map_err(Into::into),
            },
        }
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        match std::mem::replace(&mut self.reserved, Reserved::Empty) {
            Reserved::Admitted(guard) => {
                ResponseFuture::running(self.inner.call(req), guard, self.classifier.clone())
            }
            Reserved::Rejected(open) => ResponseFuture::rejected(open),
            Reserved::Empty => {
                panic!("CircuitBreaker::call called before poll_ready returned Ready")
            }
        }
    }
}
