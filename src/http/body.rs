//! Replayable request bodies: buffer a body up to a limit so it can be sent again.
//!
//! A retry (or a later replay from the queue) must send the *same* body again, but a
//! request body is a stream that can be read once. [`BufferBodyLayer`] reads the body of
//! every `http::Request<B>` (any [`http_body::Body`]: hyper's `Incoming`, `reqwest::Body`,
//! tonic's body, `Full<Bytes>`, …) into one [`Bytes`] before calling the inner service
//! with a [`ReplayBody`]:
//!
//! * a body of at most `limit` bytes is **buffered**: the inner service gets a
//!   [`ReplayBody`] that [`try_clone_body`](TryCloneBody::try_clone_body) copies for free
//!   (a reference count), so every retry sends the whole body;
//! * a larger body is **streamed through once**: the bytes already read, then the rest of
//!   the original stream. The request carries a [`BodyNotReplayable`] extension, its body
//!   cannot be cloned, and the retry layer sends it exactly once — never a truncated
//!   replay, never a panic.
//!
//! Buffering costs one copy of the body (none when the body arrives as a single `Bytes`
//! chunk) and nothing per retry. A body whose size hint already exceeds the limit is not
//! read at all before the call.
//!
//! Put the layer outside the retry. A client generic over its body type (reqwest through
//! `postbox::http::reqwest::ReqwestService`, hyper-util's client) takes
//! the [`ReplayBody`] as it is; for one with a fixed body type (tonic's `Channel` takes
//! `tonic::body::Body`) map it back inside the retry, e.g.
//! `ServiceBuilder::new().map_request(|r: http::Request<_>| r.map(tonic::body::Body::new))`.
//!
//! # Example
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use postbox::http::body::{BodyNotReplayable, BufferBodyLayer, ReplayBody, TryCloneBody};
//! use tower::{Layer, Service, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut svc = BufferBodyLayer::new(4).layer(service_fn(
//!     |req: http::Request<ReplayBody<Full<Bytes>>>| async move {
//!         let replayable = req.body().try_clone_body().is_some();
//!         let reason = req.extensions().get::<BodyNotReplayable>().copied();
//!         Ok::<_, std::convert::Infallible>((replayable, reason))
//!     },
//! ));
//! let small = http::Request::new(Full::new(Bytes::from_static(b"abc")));
//! assert_eq!(svc.ready().await.unwrap().call(small).await.unwrap(), (true, None));
//!
//! let large = http::Request::new(Full::new(Bytes::from_static(b"abcdef")));
//! let (replayable, reason) = svc.ready().await.unwrap().call(large).await.unwrap();
//! assert!(!replayable);
//! assert_eq!(reason.unwrap().limit(), 4);
//! # }
//! ```
//!
//! # Cancel safety
//! Dropping the response future drops the partly read body (and the inner future once
//! the call has been made).

use crate::BoxError;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tower_layer::Layer;
use tower_service::Service;

/// A request extension saying the body cannot be replayed: it is streamed through once
/// and must not be retried, replayed or enqueued.
///
/// Also an error (`Display`: "request body larger than the replay limit …") for layers
/// that need to say why they did not retry or defer a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BodyNotReplayable {
    limit: usize,
    reason: NotReplayableReason,
}

/// Why a body could not be buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotReplayableReason {
    /// It is larger than the limit.
    TooLarge,
    /// Reading it failed before its end; the inner service sees the same error.
    ReadFailed,
    /// Its gRPC method is named in `stream_through`: never read first.
    StreamThrough,
}

impl BodyNotReplayable {
    /// A body larger than `limit` bytes.
    pub const fn new(limit: usize) -> Self {
        Self {
            limit,
            reason: NotReplayableReason::TooLarge,
        }
    }

    /// A body of a method named in `stream_through`, sent as it streams.
    pub const fn stream_through(limit: usize) -> Self {
        Self {
            limit,
            reason: NotReplayableReason::StreamThrough,
        }
    }

    /// A body whose reading failed while it was being buffered under `limit`.
    pub const fn read_failed(limit: usize) -> Self {
        Self {
            limit,
            reason: NotReplayableReason::ReadFailed,
        }
    }

    /// The buffering limit, in bytes.
    pub const fn limit(&self) -> usize {
        self.limit
    }

    /// Why the body was not buffered.
    pub const fn reason(&self) -> NotReplayableReason {
        self.reason
    }

    /// `true` if the request is marked as not replayable.
    pub fn is_marked<B>(req: &Request<B>) -> bool {
        req.extensions().get::<Self>().is_some()
    }
}

impl fmt::Display for BodyNotReplayable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            NotReplayableReason::TooLarge => write!(
                f,
                "request body larger than the replay limit of {} bytes; sent once, not retried",
                self.limit
            ),
            NotReplayableReason::ReadFailed => {
                f.write_str("request body failed while being buffered; sent once, not retried")
            }
            NotReplayableReason::StreamThrough => f.write_str(
                "request body of a stream_through method, streamed; sent once, not retried",
            ),
        }
    }
}

impl std::error::Error for BodyNotReplayable {}

/// Marks a request whose body, of this many bytes, is already held whole in memory (one
/// the enqueue fallback collected to defer it, or a replay of a deferred request):
/// [`BufferBody`] keeps a body of up to that size for retries whatever its own limit,
/// since that costs no memory more. (The size, not a flag: a layer between them that
/// swapped in another body does not get it buffered without limit.)
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeldWhole(pub(crate) usize);

/// The request body failed while it was read (the caller's upload broke): the error a
/// [`ReplayBody`] yields in place of the original body's, with it as `source()`.
///
/// The client sending the request fails with it somewhere in its cause chain, and
/// [`classify_error`](crate::classify::classify_error) finds it there: the failure is
/// the caller's, not the dependency's, so it is ignored (no breaker records it, no retry
/// repeats it) rather than counted against the dependency.
///
/// That holds for clients that pass the body's error on: hyper's HTTP/1 client (the
/// `hyper` and `reqwest` glue, HTTP/1 only as postbox enables them). hyper's HTTP/2
/// client (a tonic `Channel`, or a client built with HTTP/2) does not: it logs the
/// error and resets the stream, and the call fails with the reset alone, which reads as
/// the dependency's failure. Behind an HTTP/2 client, a caller's broken upload (also
/// one that broke while this layer buffered it: the request is still sent, ending in
/// the error) counts against the dependency.
#[derive(Debug)]
pub struct RequestBodyFailed {
    source: BoxError,
}

impl RequestBodyFailed {
    /// Wraps the original body's error.
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
        }
    }
}

impl fmt::Display for RequestBodyFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request body failed while it was read: {}", self.source)
    }
}

impl std::error::Error for RequestBodyFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A body that can (perhaps) be copied for another attempt.
///
/// Implemented for every `Clone` body (`Full<Bytes>`, `Empty`, `String`, `Bytes`, `()`,
/// …) and for [`ReplayBody`], which is copyable only when it was buffered.
///
/// A `Clone` body is taken to be a whole copy. One whose clones share their source (a
/// `StreamBody` over a channel receiver that clones as a handle to the same channel)
/// is not: the first attempt drains it and a retry sends what is left. Wrap such a body
/// in [`BufferBodyLayer`] (it becomes a [`ReplayBody`]) or mark the request
/// [`BodyNotReplayable`].
pub trait TryCloneBody: Sized {
    /// A copy of the whole body, from its first byte, or `None` if it cannot be replayed.
    fn try_clone_body(&self) -> Option<Self>;
}

impl<B: Clone> TryCloneBody for B {
    #[inline]
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

pin_project! {
    /// A request body after [`BufferBodyLayer`]: either buffered (replayable) or the
    /// original stream behind the bytes already read (sent once).
    ///
    /// Errors of the original body become a boxed [`RequestBodyFailed`] (the original
    /// error is its `source()`).
    pub struct ReplayBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Buffered {
            data: Bytes,
            trailers: Option<HeaderMap>,
            // 0: data next, 1: trailers next, 2: done.
            pos: u8,
        },
        Streaming {
            prefix: Option<Bytes>,
            pending: Option<Bytes>,
            #[pin]
            rest: B,
            error: Option<BoxError>,
            done: bool,
        },
    }
}

// === impl ReplayBody ===

impl<B> ReplayBody<B> {
    /// A buffered, replayable body.
    pub fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Buffered {
                data,
                trailers,
                pos: 0,
            },
        }
    }

    /// A body that streams `prefix` (bytes already read), then the rest of `rest`; it
    /// cannot be replayed.
    pub fn streaming(prefix: Bytes, rest: B) -> Self {
        Self::streaming_parts(prefix, None, rest, None)
    }

    fn streaming_parts(
        prefix: Bytes,
        pending: Option<Bytes>,
        rest: B,
        error: Option<BoxError>,
    ) -> Self {
        Self {
            kind: Kind::Streaming {
                prefix: (!prefix.is_empty()).then_some(prefix),
                pending: pending.filter(|b| !b.is_empty()),
                rest,
                error,
                done: false,
            },
        }
    }

    /// `true` if the body was buffered and can be replayed.
    pub fn is_replayable(&self) -> bool {
        matches!(self.kind, Kind::Buffered { .. })
    }

    /// The whole buffered body, if it was buffered (what the enqueue fallback stores).
    pub fn buffered_bytes(&self) -> Option<&Bytes> {
        match &self.kind {
            Kind::Buffered { data, .. } => Some(data),
            Kind::Streaming { .. } => None,
        }
    }

    /// The buffered trailers, if the body was buffered and had any.
    pub fn buffered_trailers(&self) -> Option<&HeaderMap> {
        match &self.kind {
            Kind::Buffered { trailers, .. } => trailers.as_ref(),
            Kind::Streaming { .. } => None,
        }
    }
}

impl<B> TryCloneBody for ReplayBody<B> {
    /// A copy of the whole buffered body (even if this one was partly read); `None` for a
    /// streamed body.
    fn try_clone_body(&self) -> Option<Self> {
        match &self.kind {
            Kind::Buffered { data, trailers, .. } => {
                Some(Self::buffered(data.clone(), trailers.clone()))
            }
            Kind::Streaming { .. } => None,
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Buffered { data, trailers, .. } => f
                .debug_struct("ReplayBody::Buffered")
                .field("len", &data.len())
                .field("trailers", &trailers.is_some())
                .finish(),
            Kind::Streaming { .. } => f
                .debug_struct("ReplayBody::Streaming")
                .finish_non_exhaustive(),
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Buffered {
                data,
                trailers,
                pos,
            } => {
                if *pos == 0 {
                    *pos = 1;
                    if !data.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
                    }
                }
                if *pos == 1 {
                    *pos = 2;
                    if let Some(t) = trailers {
                        return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
                    }
                }
                Poll::Ready(None)
            }
            KindProj::Streaming {
                prefix,
                pending,
                rest,
                error,
                done,
            } => {
                if let Some(b) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                if let Some(b) = pending.take() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                if let Some(e) = error.take() {
                    *done = true;
                    return Poll::Ready(Some(Err(RequestBodyFailed::new(e).into())));
                }
                if *done {
                    return Poll::Ready(None);
                }
                match ready!(rest.poll_frame(cx)) {
                    Some(Ok(frame)) => Poll::Ready(Some(Ok(
                        frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
                    ))),
                    Some(Err(e)) => {
                        *done = true;
                        Poll::Ready(Some(Err(RequestBodyFailed::new(e).into())))
                    }
                    None => {
                        *done = true;
                        Poll::Ready(None)
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Buffered {
                data,
                trailers,
                pos,
            } => match pos {
                0 => data.is_empty() && trailers.is_none(),
                1 => trailers.is_none(),
                _ => true,
            },
            Kind::Streaming {
                prefix,
                pending,
                rest,
                error,
                done,
            } => {
                *done
                    || (prefix.is_none()
                        && pending.is_none()
                        && error.is_none()
                        && rest.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Buffered {
                data,
                pos,
                trailers,
            } => buffered_size_hint(
                if *pos == 0 { data.len() as u64 } else { 0 },
                trailers.is_some() && *pos < 2,
            ),
            Kind::Streaming {
                prefix,
                pending,
                rest,
                done,
                ..
            } => {
                if *done {
                    return SizeHint::with_exact(0);
                }
                let have =
                    prefix.as_ref().map_or(0, Bytes::len) + pending.as_ref().map_or(0, Bytes::len);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(have as u64));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(have as u64));
                }
                hint
            }
        }
    }
}

/// The size hint of a buffered body with `left` bytes still to send: exact without
/// trailers to come, only a lower bound with them — hyper sends an exact length as
/// `content-length` on HTTP/1.1, where trailers need chunked encoding, and drops them
/// without a word.
pub(crate) fn buffered_size_hint(left: u64, trailers_to_come: bool) -> SizeHint {
    if trailers_to_come {
        let mut hint = SizeHint::new();
        hint.set_lower(left);
        hint
    } else {
        SizeHint::with_exact(left)
    }
}

/// Buffers request bodies of at most `limit` bytes so they can be replayed; see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct BufferBodyLayer {
    limit: usize,
    stream_through: Option<Arc<[String]>>,
}

// === impl BufferBodyLayer ===

impl BufferBodyLayer {
    /// Buffers bodies of up to `limit` bytes (0 buffers only empty bodies). A body
    /// the enqueue fallback (`postbox::enqueue`) collected to defer it, or replays, is
    /// held whole already and kept whatever the limit.
    pub const fn new(limit: usize) -> Self {
        Self {
            limit,
            stream_through: None,
        }
    }

    /// Never reads the request bodies of the gRPC method `path` (`/package.Service/Method`,
    /// or `/package.Service/*` for every method of a service; matched against the
    /// path's last two segments, as `GrpcStatusLayer::stream_through` is — not a plain
    /// HTTP route) first: they are sent at once, streaming, not replayable (so sent
    /// once).
    ///
    /// Name every client-streaming and bidirectional gRPC method here (and every such
    /// Connect-protocol method, `application/connect+…`, which the enqueue fallback lets
    /// through by its content type but this layer does not: a server stream's one
    /// message is buffered and retried): a stream that sends a small message and waits
    /// for the answer before the next never ends and stays under the limit, so its call
    /// would never be made.
    ///
    /// # Errors
    /// A pattern that would match every call or none (`*`, a `*` before the end, no
    /// method, no service, more than two segments) is a [`ConfigError`](crate::error::ConfigError).
    pub fn stream_through(
        mut self,
        path: impl Into<String>,
    ) -> Result<Self, crate::error::ConfigError> {
        let path = path.into();
        super::check_method_pattern("buffer_body.stream_through", &path)?;
        let mut paths = self.stream_through.as_deref().unwrap_or_default().to_vec();
        paths.push(path);
        self.stream_through = Some(paths.into());
        Ok(self)
    }

    /// The limit, in bytes.
    pub const fn limit(&self) -> usize {
        self.limit
    }
}

impl<S> Layer<S> for BufferBodyLayer {
    type Service = BufferBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BufferBody {
            inner,
            limit: self.limit,
            stream_through: self.stream_through.clone(),
        }
    }
}

/// Buffers the request body, then calls the inner service with a [`ReplayBody`]; see
/// the [module docs](self).
///
/// The body type must be `Unpin` (hyper, reqwest and tonic bodies are; wrap any other in
/// `Box::pin`).
///
/// # Readiness
/// Always ready: the response future reads the body first, then waits for a clone of
/// the inner service to be ready, then calls it (tower's `Oneshot`). So a slow upload
/// holds nothing of the layers inside — a bulkhead slot, a breaker's half-open probe —
/// while it is read, and a deadline outside covers the wait for them.
///
/// # Clone
/// Needs `S: Clone`: each call readies and calls a clone of its own.
#[derive(Debug, Clone)]
pub struct BufferBody<S> {
    inner: S,
    limit: usize,
    stream_through: Option<Arc<[String]>>,
}

// === impl BufferBody ===

impl<S> BufferBody<S> {
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

impl<S, B> Service<Request<B>> for BufferBody<S>
where
    S: Service<Request<ReplayBody<B>>> + Clone,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner service is readied by the response future, once the body is read.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let service = self.inner.clone();
        let (parts, body) = req.into_parts();
        let hint = body.size_hint();
        let limit = match parts.extensions.get::<HeldWhole>() {
            Some(&HeldWhole(len)) => self.limit.max(len),
            None => self.limit,
        };
        let collect = Collect {
            service,
            parts,
            body,
            first: None,
            buf: BytesMut::new(),
            len: 0,
            // What to reserve once a second chunk shows the body is not one `Bytes`.
            expected: usize::try_from(hint.lower())
                .unwrap_or(usize::MAX)
                .min(limit),
            trailers: None,
            limit,
        };
        let streams = self.stream_through.as_deref().is_some_and(|paths| {
            let path = collect.parts.uri.path();
            paths.iter().any(|p| super::names_method(p, path))
        });
        if streams {
            // Named a stream: not read at all, and not counted as too large.
            let mark = BodyNotReplayable::stream_through(self.limit);
            let (service, req) = collect.stream_marked(Bytes::new(), None, None, mark);
            return ResponseFuture::readying(service, req);
        }
        if hint.lower() > limit as u64 {
            // Known to be too large: do not read it at all.
            let (service, req) = collect.finish_streaming(None, None);
            return ResponseFuture::readying(service, req);
        }
        ResponseFuture {
            state: State::Buffering {
                collect: Some(collect),
            },
            waited: false,
        }
    }
}

struct Collect<S, B> {
    service: S,
    parts: http::request::Parts,
    body: B,
    first: Option<Bytes>,
    buf: BytesMut,
    len: usize,
    expected: usize,
    trailers: Option<HeaderMap>,
    limit: usize,
}

impl<S, B> Collect<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    fn read_so_far(&mut self) -> Bytes {
        // `first` is moved into `buf` when a second chunk arrives: never both.
        match self.first.take() {
            Some(first) => first,
            None => self.buf.split().freeze(),
        }
    }

    /// Keeps the first chunk as it is (no copy for `Bytes` data); from the second one
    /// on, copies every chunk once into one buffer.
    fn push(&mut self, mut data: impl Buf) {
        if self.first.is_none() && self.buf.is_empty() {
            self.first = Some(data.copy_to_bytes(data.remaining()));
            return;
        }
        if let Some(first) = self.first.take() {
            let need = first.len() + data.remaining();
            self.buf.reserve(need.max(self.expected));
            self.buf.put(first);
        }
        self.buf.put(data);
    }

    /// The service and the request to call it with, the whole body buffered.
    fn finish_buffered(mut self) -> (S, Request<ReplayBody<B>>) {
        let data = self.read_so_far();
        let body = ReplayBody::buffered(data, self.trailers.take());
        (self.service, Request::from_parts(self.parts, body))
    }

    /// The service and the request to call it with, the body streamed after what was
    /// read.
    fn finish_streaming(
        mut self,
        pending: Option<Bytes>,
        error: Option<BoxError>,
    ) -> (S, Request<ReplayBody<B>>) {
        let prefix = self.read_so_far();
        let mark = if error.is_some() {
            BodyNotReplayable::read_failed(self.limit)
        } else {
            BodyNotReplayable::new(self.limit)
        };
        tracing::debug!(limit = self.limit, reason = ?mark.reason(), "request body not replayable; sent once");
        metrics::counter!("postbox_body_not_replayable_total").increment(1);
        self.stream_marked(prefix, pending, error, mark)
    }

    /// The request with its body streamed after `prefix` (and `pending`), marked `mark`.
    fn stream_marked(
        self,
        prefix: Bytes,
        pending: Option<Bytes>,
        error: Option<BoxError>,
        mark: BodyNotReplayable,
    ) -> (S, Request<ReplayBody<B>>) {
        let mut parts = self.parts;
        parts.extensions.insert(mark);
        let body = ReplayBody::streaming_parts(prefix, pending, self.body, error);
        (self.service, Request::from_parts(parts, body))
    }
}

pin_project! {
    /// Response future of [`BufferBody`]: reads the body, then readies and calls the
    /// inner service.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        #[pin]
        state: State<S, B, S::Future>,
        // Polled before: the call waited (for the body, for readiness).
        waited: bool,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, F> {
        Buffering { collect: Option<Collect<S, B>> },
        Readying { ready: Option<(S, Request<ReplayBody<B>>)> },
        Calling { #[pin] future: F },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    fn readying(service: S, req: Request<ReplayBody<B>>) -> Self {
        Self {
            state: State::Readying {
                ready: Some((service, req)),
            },
            waited: false,
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Buffering { .. } => "buffering",
            State::Readying { .. } => "readying",
            State::Calling { .. } => "calling",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, B> Future for ResponseFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut state = this.state;
        let waited = std::mem::replace(this.waited, true);
        loop {
            let next = match state.as_mut().project() {
                StateProj::Calling { future } => return future.poll(cx),
                StateProj::Readying { ready } => {
                    let (service, _) = ready
                        .as_mut()
                        .expect("buffer body future polled after completion");
                    ready!(service.poll_ready(cx))?;
                    let (mut service, mut req) = ready.take().expect("checked above");
                    if waited {
                        // Deadline headers written outside before the wait tell the
                        // next hop more time than is left.
                        crate::timeout::refresh_stale_deadline_headers(&mut req);
                    }
                    state.set(State::Calling {
                        future: service.call(req),
                    });
                    continue;
                }
                StateProj::Buffering { collect } => {
                    let c = collect
                        .as_mut()
                        .expect("buffer body future polled after completion");
                    if c.body.is_end_stream() {
                        collect.take().expect("checked above").finish_buffered()
                    } else {
                        match ready!(Pin::new(&mut c.body).poll_frame(cx)) {
                            None => collect.take().expect("checked above").finish_buffered(),
                            Some(Err(e)) => {
                                let c = collect.take().expect("checked above");
                                c.finish_streaming(None, Some(e.into()))
                            }
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(mut data) => {
                                    c.len = c.len.saturating_add(data.remaining());
                                    if c.len > c.limit {
                                        let chunk = data.copy_to_bytes(data.remaining());
                                        let c = collect.take().expect("checked above");
                                        c.finish_streaming(Some(chunk), None)
                                    } else {
                                        c.push(data);
                                        continue;
                                    }
                                }
                                Err(frame) => {
                                    if let Ok(t) = frame.into_trailers() {
                                        match &mut c.trailers {
                                            Some(have) => have.extend(t),
                                            None => c.trailers = Some(t),
                                        }
                                    }
                                    continue;
                                }
                            },
                        }
                    }
                }
            };
            state.set(State::Readying { ready: Some(next) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;

    type Captured = (Option<Bytes>, bool, Option<BodyNotReplayable>);

    /// A request body that never sends anything (a slow upload).
    struct Stalled;

    impl Body for Stalled {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Pending
        }
    }

    /// A slow upload holds nothing of the layers inside while it is read: with a
    /// bulkhead of one inside, another request still goes through (the upload's
    /// `poll_ready` reserved the only slot, and its future kept it while reading).
    #[tokio::test]
    async fn a_slow_request_body_does_not_hold_a_bulkhead_slot() {
        use tower::{Layer, ServiceExt};
        enum Either {
            Stalled(Stalled),
            Full(Full<Bytes>),
        }
        impl Body for Either {
            type Data = Bytes;
            type Error = Infallible;
            fn poll_frame(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
                match self.get_mut() {
                    Either::Stalled(b) => Pin::new(b).poll_frame(cx),
                    Either::Full(b) => Pin::new(b).poll_frame(cx),
                }
            }
        }
        let inner =
            tower::service_fn(|_: Request<ReplayBody<Either>>| async { Ok::<_, BoxError>("done") });
        let svc = BufferBodyLayer::new(1024)
            .layer(crate::bulkhead::BulkheadLayer::new(1).unwrap().layer(inner));
        let mut upload =
            tokio_test::task::spawn(svc.clone().oneshot(Request::new(Either::Stalled(Stalled))));
        tokio_test::assert_pending!(upload.poll());
        let other = svc
            .clone()
            .oneshot(Request::new(Either::Full(Full::from("{}"))))
            .await;
        assert_eq!(other.unwrap(), "done", "the upload held the bulkhead");
        tokio_test::assert_pending!(upload.poll());
    }

    /// A buffered body with trailers does not claim an exact length (hyper would send
    /// it with `content-length` on HTTP/1.1 and drop the trailers); one without does.
    #[test]
    fn a_buffered_body_with_trailers_has_no_exact_size() {
        let data = Bytes::from_static(b"abc");
        let plain = ReplayBody::<Full<Bytes>>::buffered(data.clone(), None);
        assert_eq!(plain.size_hint().exact(), Some(3));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "1".parse().unwrap());
        let with = ReplayBody::<Full<Bytes>>::buffered(data, Some(trailers));
        assert_eq!(with.size_hint().exact(), None);
        assert_eq!(with.size_hint().lower(), 3);
    }

    /// A request body that sends one message, then waits (a bidirectional stream
    /// waiting for the answer to its first message).
    struct OneThenWait(Option<Bytes>);

    impl Body for OneThenWait {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.0.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }

    /// A streaming method named with `stream_through` is called at once, its body
    /// streamed and not replayable; another method's body is read first (and this one
    /// would never end).
    #[tokio::test(start_paused = true)]
    async fn a_stream_through_method_is_called_without_reading_its_body() {
        use tower::{Layer, ServiceExt};
        let inner = tower::service_fn(|req: Request<ReplayBody<OneThenWait>>| async move {
            // Marked as a stream, not as a body over the limit.
            let mark = req.extensions().get::<BodyNotReplayable>();
            assert_eq!(
                mark.map(BodyNotReplayable::reason),
                Some(NotReplayableReason::StreamThrough)
            );
            Ok::<_, BoxError>(req.body().is_replayable())
        });
        let layer = BufferBodyLayer::new(64 * 1024)
            .stream_through("/chat.Chat/Talk")
            .unwrap();
        let svc = layer.layer(inner);
        let talk = Request::post("/chat.Chat/Talk")
            .body(OneThenWait(Some(Bytes::from_static(b"hi"))))
            .unwrap();
        let called =
            tokio::time::timeout(std::time::Duration::from_secs(1), svc.clone().oneshot(talk));
        assert!(!called.await.expect("never called").unwrap(), "replayable");
        let other = Request::post("/chat.Chat/Other")
            .body(OneThenWait(Some(Bytes::from_static(b"hi"))))
            .unwrap();
        let mut other = tokio_test::task::spawn(svc.oneshot(other));
        tokio_test::assert_pending!(other.poll());
    }

    async fn run<B>(limit: usize, body: B) -> (Captured, Bytes)
    where
        B: Body + Unpin + Send + 'static,
        B::Error: Into<BoxError>,
    {
        run_request(limit, Request::new(body)).await
    }

    async fn run_request<B>(limit: usize, req: Request<B>) -> (Captured, Bytes)
    where
        B: Body + Unpin + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let svc = tower::service_fn(|req: Request<ReplayBody<B>>| async move {
            let captured = (
                req.body().buffered_bytes().cloned(),
                req.body().try_clone_body().is_some(),
                req.extensions().get::<BodyNotReplayable>().copied(),
            );
            let bytes = req.into_body().collect().await.map(|c| c.to_bytes());
            Ok::<_, Infallible>((captured, bytes.unwrap()))
        });
        let mut svc = BufferBodyLayer::new(limit).layer(svc);
        use tower::ServiceExt;
        svc.ready().await.unwrap().call(req).await.unwrap()
    }

    /// A body of several chunks with no size hint, like a network stream.
    struct Chunks(std::collections::VecDeque<&'static [u8]>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|c| Ok(Frame::data(Bytes::from_static(c)))),
            )
        }
    }

    fn chunks(parts: &[&'static [u8]]) -> Chunks {
        Chunks(parts.iter().copied().collect())
    }

    #[tokio::test]
    async fn small_body_is_buffered_and_replayable() {
        let ((bytes, cloneable, marked), sent) =
            run(8, Full::new(Bytes::from_static(b"hello"))).await;
        assert_eq!(bytes.as_deref(), Some(&b"hello"[..]));
        assert!(cloneable);
        assert_eq!(marked, None);
        assert_eq!(&sent[..], b"hello");
    }

    /// A body held whole already (the enqueue fallback collected it, or replays it) is
    /// kept for retries whatever the limit: a smaller buffer turned off the retries of
    /// every larger deferrable request.
    #[tokio::test]
    async fn a_body_held_whole_already_is_kept_whatever_the_limit() {
        let mut req = Request::new(Full::new(Bytes::from_static(b"hello")));
        req.extensions_mut().insert(HeldWhole(5));
        let ((bytes, cloneable, marked), sent) = run_request(3, req).await;
        assert_eq!(bytes.as_deref(), Some(&b"hello"[..]));
        assert!(cloneable);
        assert_eq!(marked, None);
        assert_eq!(&sent[..], b"hello");
        // Another, larger body swapped in under the mark is not buffered past both.
        let mut req = Request::new(Full::new(Bytes::from_static(b"hello, world")));
        req.extensions_mut().insert(HeldWhole(5));
        let ((bytes, cloneable, marked), sent) = run_request(3, req).await;
        assert_eq!(bytes, None);
        assert!(!cloneable);
        assert_eq!(marked, Some(BodyNotReplayable::new(5)));
        assert_eq!(&sent[..], b"hello, world");
    }

    #[tokio::test]
    async fn large_body_streams_through_whole_and_is_marked() {
        let ((bytes, cloneable, marked), sent) =
            run(3, Full::new(Bytes::from_static(b"hello"))).await;
        assert_eq!(bytes, None);
        assert!(!cloneable);
        assert_eq!(marked, Some(BodyNotReplayable::new(3)));
        assert_eq!(&sent[..], b"hello");
    }

    #[tokio::test]
    async fn chunked_body_under_the_limit_is_joined() {
        let ((bytes, cloneable, _), sent) = run(16, chunks(&[b"ab", b"cd", b"ef"])).await;
        assert_eq!(bytes.as_deref(), Some(&b"abcdef"[..]));
        assert!(cloneable);
        assert_eq!(&sent[..], b"abcdef");
    }

    #[tokio::test]
    async fn chunked_body_over_the_limit_keeps_every_byte_once() {
        let ((bytes, cloneable, marked), sent) = run(3, chunks(&[b"ab", b"cd", b"ef"])).await;
        assert_eq!(bytes, None);
        assert!(!cloneable);
        assert_eq!(marked.map(|m| m.limit()), Some(3));
        assert_eq!(&sent[..], b"abcdef");
    }

    #[test]
    fn a_partly_read_buffered_body_clones_whole() {
        let mut body: ReplayBody<Full<Bytes>> =
            ReplayBody::buffered(Bytes::from_static(b"xyz"), None);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let first = Pin::new(&mut body).poll_frame(&mut cx);
        assert!(matches!(first, Poll::Ready(Some(Ok(_)))));
        assert!(body.is_end_stream());
        let again = body.try_clone_body().unwrap();
        assert_eq!(again.size_hint().exact(), Some(3));
    }

    /// One chunk, then an error.
    struct Failing(bool);

    impl Body for Failing {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            if self.0 {
                return Poll::Ready(Some(Err(std::io::ErrorKind::ConnectionReset.into())));
            }
            self.0 = true;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"ab")))))
        }
    }

    /// Ends, and panics if polled after its end (as a body may).
    struct EndsOnce(bool);

    impl Body for EndsOnce {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            assert!(!self.0, "polled after its end");
            self.0 = true;
            Poll::Ready(None)
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::new()
        }
    }

    /// A streamed body that ended, or failed, is not polled again (`http_body` leaves a
    /// body polled past its end undefined), and then reports an end and no size left.
    #[test]
    fn a_streamed_body_is_fused_after_its_end_or_its_error() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);

        let mut ended = ReplayBody::streaming(Bytes::from_static(b"ab"), EndsOnce(false));
        let first = Pin::new(&mut ended).poll_frame(&mut cx);
        assert!(matches!(first, Poll::Ready(Some(Ok(_)))));
        for _ in 0..2 {
            assert!(matches!(
                Pin::new(&mut ended).poll_frame(&mut cx),
                Poll::Ready(None)
            ));
        }
        assert!(ended.is_end_stream());
        assert_eq!(ended.size_hint().exact(), Some(0));

        let mut failed = ReplayBody::streaming(Bytes::new(), Failing(true));
        let first = Pin::new(&mut failed).poll_frame(&mut cx);
        assert!(matches!(first, Poll::Ready(Some(Err(_)))));
        assert!(
            matches!(Pin::new(&mut failed).poll_frame(&mut cx), Poll::Ready(None)),
            "the error is passed on once"
        );
        assert!(failed.is_end_stream());
        assert_eq!(failed.size_hint().exact(), Some(0));
    }

    #[tokio::test]
    async fn a_body_that_fails_is_passed_on_once_with_its_error() {
        let svc = tower::service_fn(|req: Request<ReplayBody<Failing>>| async move {
            let mark = req.extensions().get::<BodyNotReplayable>().copied();
            let cloneable = req.body().try_clone_body().is_some();
            let read = req.into_body().collect().await;
            Ok::<_, Infallible>((mark, cloneable, read.is_err()))
        });
        use tower::ServiceExt;
        let (mark, cloneable, failed) = BufferBodyLayer::new(1024)
            .layer(svc)
            .oneshot(Request::new(Failing(false)))
            .await
            .unwrap();
        let mark = mark.unwrap();
        assert_eq!(mark.reason(), NotReplayableReason::ReadFailed);
        assert!(mark.to_string().contains("failed"));
        assert!(!cloneable);
        assert!(failed, "the inner service sees the body's error");
    }

    /// The client sending a body that failed fails with it in its cause chain, and that
    /// failure is the caller's: ignored (no breaker counts it, no retry repeats it),
    /// not a failure of the dependency. (A broken upload counted against the
    /// dependency's breaker, as a connection reset would.)
    #[tokio::test]
    async fn a_failed_upload_is_not_counted_against_the_dependency() {
        /// A client error wrapping the body's, as hyper's and reqwest's do.
        #[derive(Debug)]
        struct ClientError(BoxError);
        impl fmt::Display for ClientError {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for ClientError {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&*self.0)
            }
        }
        let client = tower::service_fn(|req: Request<ReplayBody<Failing>>| async move {
            let e = req.into_body().collect().await.expect_err("the body fails");
            Err::<(), BoxError>(Box::new(ClientError(e)))
        });
        use tower::ServiceExt;
        let err = BufferBodyLayer::new(1024)
            .layer(client)
            .oneshot(Request::new(Failing(false)))
            .await
            .unwrap_err();
        let class = crate::classify::classify_error(&*err);
        assert!(class.is_ignored(), "{class:?}");
        assert!(!class.is_retryable());
        let io = crate::error::find_cause::<std::io::Error>(&*err).expect("the cause is kept");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
    }
}
