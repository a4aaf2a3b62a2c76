use super::error::Full;
use super::future::ResponseFuture;
use crate::BoxError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Sleep;
use tower_service::Service;

/// State shared by every service of one [`BulkheadLayer`](super::BulkheadLayer).
///
/// Permits are an atomic counter: taking one is a compare-and-swap, giving it back a
/// decrement, and a waiter is woken (through [`Notify`]) only when someone waits. A
/// woken waiter competes with new callers for the freed permit, so waiting is not
/// strictly first-come first-served; a waiter that gives up passes its wake-up on.
#[derive(Debug)]
pub(crate) struct Shared {
    in_flight: AtomicUsize,
    waiting: AtomicUsize,
    notify: Notify,
    max_concurrent: usize,
    max_waiting: usize,
    max_wait: Option<Duration>,
}

impl Shared {
    pub(crate) fn new(
        max_concurrent: usize,
        max_waiting: usize,
        max_wait: Option<Duration>,
    ) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            notify: Notify::new(),
            max_concurrent,
            max_waiting,
            max_wait,
        }
    }

    /// Whether a caller that finds no free permit may wait for one.
    pub(crate) fn may_wait(&self) -> bool {
        self.max_waiting > 0
    }

    /// Permits neither reserved nor in flight.
    pub(crate) fn available_permits(&self) -> usize {
        self.max_concurrent
            .saturating_sub(self.in_flight.load(Ordering::SeqCst))
    }

    pub(crate) fn full(&self) -> Full {
        Full::new(self.max_concurrent, self.max_waiting)
    }

    /// Takes a permit if one is free.
    #[inline]
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        // SeqCst loads too: a waiter that finds the bulkhead full must see a `release`
        // that did not see its `waiting` increment (see `release`). (On x86 a SeqCst
        // load is a plain load.)
        let mut cur = self.in_flight.load(Ordering::SeqCst);
        loop {
            if cur >= self.max_concurrent {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Some(Permit(self.clone())),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Gives a permit back and wakes a waiter, if any.
    #[inline]
    fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        // SeqCst on both sides: either this load sees the waiter's increment, or the
        // waiter's `try_acquire` (after its increment) sees this decrement.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_one();
        }
    }

    /// Takes a waiting slot if fewer than `max_waiting` are taken.
    fn enter_waiting(self: &Arc<Self>) -> Option<WaitSlot> {
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_waiting).then_some(n + 1)
            })
            .ok()
            .map(|_| WaitSlot(self.clone()))
    }
}

/// A permit: one call in flight, given back on drop.
#[derive(Debug)]
pub(crate) struct Permit(Arc<Shared>);

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A taken waiting slot, given back on drop.
struct WaitSlot(Arc<Shared>);

impl Drop for WaitSlot {
    fn drop(&mut self) {
        let shared = &self.0;
        shared.waiting.fetch_sub(1, Ordering::SeqCst);
        // If this waiter was woken for a permit it will not take (it timed out or was
        // dropped), the next waiter must be woken. tokio's `Notified` already passes on
        // a `notify_one` it received but did not consume when it is dropped; this is the
        // guard that does not rely on that (at worst a spurious wake-up, which
        // `acquire`'s loop absorbs).
        if shared.available_permits() > 0 && shared.waiting.load(Ordering::SeqCst) > 0 {
            shared.notify.notify_one();
        }
    }
}

type Acquire = Pin<Box<dyn Future<Output = Permit> + Send + Sync>>;

/// Waits until a permit is free and takes it.
async fn acquire(shared: Arc<Shared>) -> Permit {
    loop {
        let mut notified = std::pin::pin!(shared.notify.notified());
        // Register before checking, so a release between the check and the wait is
        // not missed.
        notified.as_mut().enable();
        if let Some(permit) = shared.try_acquire() {
            return permit;
        }
        notified.await;
    }
}

/// A caller waiting for a permit (the slow path; allocated only when the bulkhead is
/// full and waiting is allowed).
struct Waiter {
    acquire: Acquire,
    timer: Option<Pin<Box<Sleep>>>,
    _slot: WaitSlot,
}

enum State {
    Empty,
    Waiting(Box<Waiter>),
    Ready(Permit),
    Rejected(Full),
}

/// Limits the calls in flight to the inner service; see the [module docs](super).
///
/// Errors become [`BoxError`]; a rejection is [`Full`].
///
/// # Clone
/// A clone shares the permits but not a permit reserved by `poll_ready`: it starts
/// unreserved.
pub struct Bulkhead<S> {
    inner: S,
    shared: Arc<Shared>,
    state: State,
}

// === impl Bulkhead ===

impl<S> Bulkhead<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            shared,
            state: State::Empty,
        }
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

    fn reject(&mut self, full: Full) {
        tracing::debug!(waited = ?full.waited(), "bulkhead full; rejecting");
        self.state = State::Rejected(full);
    }
}

/// The answer to a call the bulkhead turns away, counted.
pub(crate) fn rejected<F>(full: Full) -> ResponseFuture<F> {
    metrics::counter!("postbox_calls_total", "layer" => "bulkhead", "outcome" => "rejected")
        .increment(1);
    ResponseFuture::rejected(full)
}

impl<S: Clone> Clone for Bulkhead<S> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.shared.clone())
    }
}

impl<S: fmt::Debug> fmt::Debug for Bulkhead<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Empty => "empty",
            State::Waiting(_) => "waiting",
            State::Ready(_) => "ready",
            State::Rejected(_) => "rejected",
        };
        f.debug_struct("Bulkhead")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .field("state", &state)
            .finish()
    }
}

impl<S, Req> Service<Req> for Bulkhead<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            match &mut self.state {
                State::Ready(_) => {
                    let ready = self.inner.poll_ready(cx);
                    if let Poll::Ready(Err(_)) = &ready {
                        // A service that failed may be dropped late (a balancer keeps
                        // it), or polled again: its permit is not kept meanwhile.
                        self.state = State::Empty;
                    }
                    return ready.map_err(Into::into);
                }
                // Polled again, a rejection is not kept: admission runs afresh, so a
                // permit or a waiting slot freed since is taken rather than failing a
                // call that fits (a cache of ready services polls again before it
                // calls).
                // One that already waited its `max_wait` takes only a free permit: it
                // does not wait again (polled again and again, it would never fail).
                State::Rejected(full) => match self.shared.try_acquire() {
                    Some(permit) => self.state = State::Ready(permit),
                    None if full.waited().is_some() => return Poll::Ready(Ok(())),
                    None => self.state = State::Empty,
                },
                State::Empty => match self.shared.try_acquire() {
                    Some(permit) => self.state = State::Ready(permit),
                    None => match self.shared.enter_waiting() {
                        None => {
                            let full = self.shared.full();
                            self.reject(full);
                            return Poll::Ready(Ok(()));
                        }
                        Some(slot) => {
                            let timer = self
                                .shared
                                .max_wait
                                .map(|d| Box::pin(tokio::time::sleep(d)));
                            let acquire: Acquire = Box::pin(acquire(self.shared.clone()));
                            self.state = State::Waiting(Box::new(Waiter {
                                acquire,
                                timer,
                                _slot: slot,
                            }));
                        }
                    },
                },
                State::Waiting(w) => {
                    if let Poll::Ready(permit) = w.acquire.as_mut().poll(cx) {
                        self.state = State::Ready(permit);
                        continue;
                    }
                    if let Some(timer) = &mut w.timer
                        && timer.as_mut().poll(cx).is_ready()
                    {
                        // `max_wait`, plus however late this poll came after the timer.
                        let late =
                            tokio::time::Instant::now().saturating_duration_since(timer.deadline());
                        let waited = self
                            .shared
                            .max_wait
                            .unwrap_or_default()
                            .saturating_add(late);
                        let full = self.shared.full().after_waiting(waited);
                        self.reject(full);
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match std::mem::replace(&mut self.state, State::Empty) {
            State::Ready(permit) => ResponseFuture::running(self.inner.call(req), permit),
            // Counted here: a permit freed before `call` may still admit it.
            State::Rejected(full) => rejected(full),
            State::Empty | State::Waiting(_) => {
                panic!("Bulkhead::call called before poll_ready returned Ready")
            }
        }
    }
}
