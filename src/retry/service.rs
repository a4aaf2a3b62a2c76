use super::future::ResponseFuture;
use super::policy::{CloneRequest, OnRetry, RetryPolicy};
use crate::classify::Classify;
use std::fmt;
use std::mem;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tower_service::Service;

/// Retries failed attempts that the classifier calls retryable; see the
/// [module docs](super).
///
/// The error type is the inner service's: a retry adds no errors of its own and
/// returns the last attempt's outcome when it stops.
///
/// # Clone
/// Needs `S: Clone`: every call takes the ready service into its response future
/// (`mem::replace` with a clone), which polls it ready again before each retry. Clones
/// share the policy's budget.
///
///
/// # Metrics
/// First attempts are counted in `postbox_retry_attempts_total` through a handle
/// registered when the service is made (the `metrics` crate's advice for hot paths), so
/// install the recorder before building the stack; everything else is counted through
/// the recorder current at the time.
#[derive(Clone)]
pub struct Retry<S, P> {
    inner: S,
    policy: P,
    first_attempts: metrics::Counter,
}

// === impl Retry ===

impl<S, C, R, H> Retry<S, RetryPolicy<C, R, H>> {
    /// Wraps `inner` with `policy`.
    pub fn new(inner: S, policy: RetryPolicy<C, R, H>) -> Self {
        Self {
            inner,
            policy,
            first_attempts: metrics::counter!("postbox_retry_attempts_total"),
        }
    }
}

impl<S: fmt::Debug, P: fmt::Debug> fmt::Debug for Retry<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<S, P> Retry<S, P> {
    /// The policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the layer, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req, C, R, H> Service<Req> for Retry<S, RetryPolicy<C, R, H>>
where
    S: Service<Req> + Clone,
    C: Classify<S::Response, S::Error> + Clone,
    R: CloneRequest<Req> + Clone,
    H: OnRetry + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, Req, RetryPolicy<C, R, H>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, mut req: Req) -> Self::Future {
        self.first_attempts.increment(1);
        let policy = &self.policy;
        policy.requests.prepare(&mut req);
        let retry_safe = policy.requests.is_retry_safe(&req);
        if let Some(budget) = &policy.budget {
            deposit(budget);
        }
        // Keep the original for later attempts and send a copy; the last attempt sends
        // the original itself.
        let (send, keep) = if policy.max_retries == 0 {
            (req, None)
        } else {
            match policy.requests.clone_request(&req) {
                Some(copy) => (copy, Some(req)),
                None => (req, None),
            }
        };
        let clone = self.inner.clone();
        let mut service = mem::replace(&mut self.inner, clone);
        // Every attempt runs in a `debug` span; with no subscriber interested this is a
        // disabled span (no allocation).
        let span = tracing::debug_span!("retry_attempt", attempt = 1u32);
        let future = {
            let _entered = span.enter();
            service.call(send)
        };
        ResponseFuture::new(keep, service, self.policy.clone(), retry_safe, future, span)
    }
}

/// Out of line, so `call` stays small enough to inline (and to build its future in
/// place). The precise clock is read only where no coarse one is found (see
/// [`RetryBudget::deposit_with`]).
///
/// [`RetryBudget::deposit_with`]: super::RetryBudget::deposit_with
#[inline(never)]
fn deposit(budget: &super::RetryBudget) {
    budget.deposit_with(Instant::now);
}
