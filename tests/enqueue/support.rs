//! Helpers for the enqueue tests.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use postbox::BoxError;
use postbox::enqueue::BufferedBody;
use postbox::queue::{
    DeadLetter, Depth, Enqueued, Envelope, LeaseToken, Leased, MemoryQueue, MessageId, Queue,
    QueueError,
};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The request type the inner (resilient) stack sees.
pub(crate) type InnerReq = Request<BufferedBody<Full<Bytes>>>;
/// The response type of test dependencies.
pub(crate) type Res = Response<Full<Bytes>>;

/// A `POST` with `body`.
pub(crate) fn post(uri: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(uri)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// A response with `status` and `body`.
pub(crate) fn respond(status: u16, body: &'static str) -> Res {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res
}

/// The whole body of `body`.
pub(crate) async fn bytes_of<B>(body: B) -> Bytes
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    body.collect().await.unwrap().to_bytes()
}

/// Waits (in paused time) until `cond` holds, failing after ten virtual minutes.
pub(crate) async fn eventually(mut cond: impl FnMut() -> bool) {
    for _ in 0..60_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 10 virtual minutes");
}

/// A body of `chunks` with no size hint (like a chunked upload).
#[derive(Debug)]
pub(crate) struct Chunked(pub(crate) VecDeque<Bytes>);

impl Chunked {
    /// `n` chunks of `size` bytes of `b'x'`.
    pub(crate) fn new(n: usize, size: usize) -> Self {
        Self((0..n).map(|_| Bytes::from(vec![b'x'; size])).collect())
    }
}

impl Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A request body whose one frame arrives after a delay (a slow upload).
pub(crate) struct Delayed {
    pub(crate) sleep: Pin<Box<tokio::time::Sleep>>,
    pub(crate) data: Option<Bytes>,
}

impl Delayed {
    pub(crate) fn new(after: std::time::Duration, data: &'static [u8]) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep(after)),
            data: Some(Bytes::from_static(data)),
        }
    }
}

impl Body for Delayed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
    }
}

/// A request body that sends one frame and then fails: the caller's upload broke.
pub(crate) struct BreaksAfter(pub(crate) Option<Bytes>);

impl Body for BreaksAfter {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(Some(match self.0.take() {
            Some(data) => Ok(Frame::data(data)),
            None => Err(std::io::ErrorKind::ConnectionReset.into()),
        }))
    }
}

/// A request body that sends one message and then waits for ever: a streaming gRPC
/// call's, which ends only after its answer begins.
pub(crate) struct NeverEnds(pub(crate) Option<Bytes>);

impl Body for NeverEnds {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(first) => Poll::Ready(Some(Ok(Frame::data(first)))),
            None => Poll::Pending,
        }
    }
}

/// A boxed error from anything.
pub(crate) fn boxed(e: impl Into<BoxError>) -> BoxError {
    e.into()
}

/// A [`MemoryQueue`] that records every `ack` call: how many tokens it carried and when
/// (paused tokio time), and can make the calls that settle a lease (`ack`,
/// `retry_later`, `release`, `dead_letter`) fail as unavailable. Everything else is
/// delegated unchanged.
#[derive(Clone, Default)]
pub(crate) struct AckRecorder {
    pub(crate) inner: MemoryQueue,
    acks: Arc<Mutex<Vec<(usize, Instant)>>>,
    outage: Arc<AtomicUsize>,
    /// How long a failing `release` takes to answer (a broker dropping packets: the
    /// client's timeout).
    outage_delay: Arc<Mutex<Duration>>,
    stale: Arc<std::sync::atomic::AtomicBool>,
    /// The tokens of the leases handed out, for [`give_back_leases`](Self::give_back_leases).
    leased: Arc<Mutex<Vec<LeaseToken>>>,
    /// How many `dead_letter` calls were made, and how many there were at each
    /// `depth` call.
    dead_lettered: Arc<AtomicUsize>,
    depth_calls: Arc<Mutex<Vec<usize>>>,
}

impl AckRecorder {
    /// Puts every message leased so far back, due at once and uncounted, behind the
    /// holders' backs: as a broker requeues the deliveries of a connection that
    /// dropped (their tokens are stale now).
    pub(crate) async fn give_back_leases(&self) {
        let tokens = std::mem::take(&mut *self.leased.lock().unwrap());
        for token in tokens {
            let _ = self.inner.release(token, SystemTime::UNIX_EPOCH).await;
        }
    }

    /// For each `depth` call so far, how many `dead_letter` calls came before it.
    pub(crate) fn depth_calls(&self) -> Vec<usize> {
        self.depth_calls.lock().unwrap().clone()
    }

    /// The `ack` calls so far: batch size and time of each.
    pub(crate) fn acks(&self) -> Vec<(usize, Instant)> {
        self.acks.lock().unwrap().clone()
    }

    /// The next `n` calls that settle a lease fail with [`QueueError::Unavailable`]
    /// (without reaching the queue).
    pub(crate) fn fail_next_settles(&self, n: usize) {
        self.outage.store(n, Ordering::SeqCst);
    }

    /// As [`fail_next_settles`](Self::fail_next_settles), a failing `release` or
    /// `dead_letter` answering only after `delay`.
    pub(crate) fn fail_next_settles_after(&self, n: usize, delay: Duration) {
        *self.outage_delay.lock().unwrap() = delay;
        self.fail_next_settles(n);
    }

    /// Every `ack` of more than one token from now on finds its last token stale (as
    /// one whose lease lapsed while its ack waited; acked here first, behind the
    /// caller's back): the queue acks the others and answers [`QueueError::LeaseLost`].
    pub(crate) fn make_the_last_token_of_acks_stale(&self) {
        self.stale.store(true, Ordering::SeqCst);
    }

    /// Whether this settle call fails (one of the outage's).
    fn down(&self) -> Option<QueueError> {
        let failing = self
            .outage
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        failing.then(|| QueueError::Unavailable("test outage".into()))
    }
}

impl Queue for AckRecorder {
    fn enqueue(
        &self,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Enqueued, QueueError>> + Send {
        self.inner.enqueue(envelope)
    }

    fn lease(
        &self,
        max: usize,
        lease_for: Duration,
        now: SystemTime,
    ) -> impl Future<Output = Result<Vec<Leased>, QueueError>> + Send {
        let (inner, leased) = (self.inner.clone(), self.leased.clone());
        async move {
            let got = inner.lease(max, lease_for, now).await?;
            leased.lock().unwrap().extend(got.iter().map(|l| l.token));
            Ok(got)
        }
    }

    fn ack(&self, tokens: &[LeaseToken]) -> impl Future<Output = Result<(), QueueError>> + Send {
        self.acks
            .lock()
            .unwrap()
            .push((tokens.len(), Instant::now()));
        let (down, inner, tokens) = (self.down(), self.inner.clone(), tokens.to_vec());
        let stale = self.stale.load(Ordering::SeqCst) && tokens.len() > 1;
        async move {
            down.map_or(Ok(()), Err)?;
            if stale {
                inner.ack(&tokens[tokens.len() - 1..]).await?;
            }
            inner.ack(&tokens).await
        }
    }

    fn retry_later(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        let (down, inner) = (self.down(), self.inner.clone());
        async move {
            down.map_or(Ok(()), Err)?;
            inner.retry_later(token, not_before).await
        }
    }

    fn release(
        &self,
        token: LeaseToken,
        not_before: SystemTime,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        let (down, inner) = (self.down(), self.inner.clone());
        let delay = *self.outage_delay.lock().unwrap();
        async move {
            if let Some(e) = down {
                tokio::time::sleep(delay).await;
                return Err(e);
            }
            inner.release(token, not_before).await
        }
    }

    fn dead_letter(
        &self,
        token: LeaseToken,
        reason: &str,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        self.dead_lettered.fetch_add(1, Ordering::SeqCst);
        let (down, inner, reason) = (self.down(), self.inner.clone(), reason.to_owned());
        let delay = *self.outage_delay.lock().unwrap();
        async move {
            if let Some(e) = down {
                tokio::time::sleep(delay).await;
                return Err(e);
            }
            inner.dead_letter(token, &reason).await
        }
    }

    fn depth(&self) -> impl Future<Output = Result<Depth, QueueError>> + Send {
        self.depth_calls
            .lock()
            .unwrap()
            .push(self.dead_lettered.load(Ordering::SeqCst));
        self.inner.depth()
    }

    fn dead_letters(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, QueueError>> + Send {
        self.inner.dead_letters(max)
    }

    fn discard_dead_letters(
        &self,
        ids: &[MessageId],
    ) -> impl Future<Output = Result<u64, QueueError>> + Send {
        self.inner.discard_dead_letters(ids)
    }
}
