//! [`BufferedBody`]: the request body the HTTP flavour sends downstream.

use crate::BoxError;
use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

pin_project! {
    /// A body that is either fully buffered (replayable, capturable) or streamed through
    /// from the caller's body `B`, after the frames already read from it.
    ///
    /// [`EnqueueFallback`](super::EnqueueFallback) reads the caller's body up to its
    /// limit before the call: a body within the limit becomes
    /// [`BufferedBody::full`]; a larger one continues as a stream (the frames read so
    /// far, then the rest of `B`) and the request is not deferrable. The
    /// [`Idempotency`](crate::idempotency::Idempotency) layer uses it for responses the
    /// same way.
    ///
    /// Data is [`Bytes`]; errors are [`BoxError`]. It implements [`http_body::Body`] so
    /// it drops into hyper and hyper-util clients as is, and into reqwest with
    /// `reqwest::Body::wrap`.
    pub struct BufferedBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        // `read`: a frame was taken; what is left is no longer the whole body.
        Full { data: Option<Bytes>, trailers: Option<HeaderMap>, read: bool },
        Streaming {
            prefix: VecDeque<Frame<Bytes>>,
            #[pin]
            rest: B,
            // The caller's request body: its errors are `RequestBodyFailed`.
            upload: bool,
            // `rest` ended (or failed): not polled again (a stream may panic then).
            ended: bool,
        },
        Failed { error: Option<BoxError> },
    }
}

// === impl BufferedBody ===

impl<B> BufferedBody<B> {
    /// A fully buffered body.
    pub fn full(data: impl Into<Bytes>) -> Self {
        Self::full_with_trailers(data, None)
    }

    /// A fully buffered body, then `trailers` (a gRPC response's status).
    pub(crate) fn full_with_trailers(data: impl Into<Bytes>, trailers: Option<HeaderMap>) -> Self {
        let data = data.into();
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
                read: false,
            },
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    /// `body` streamed through untouched.
    pub fn streaming(body: B) -> Self {
        Self::resume(VecDeque::new(), body)
    }

    /// The frames in `prefix`, then the rest of `body`.
    pub(crate) fn resume(prefix: VecDeque<Frame<Bytes>>, rest: B) -> Self {
        Self {
            kind: Kind::Streaming {
                prefix,
                rest,
                upload: false,
                ended: false,
            },
        }
    }

    /// Marks a streamed body as the caller's request body: an error reading it is
    /// the caller's upload breaking, a [`RequestBodyFailed`] (which no breaker counts
    /// and no retry repeats), not the dependency's failure.
    ///
    /// [`RequestBodyFailed`]: crate::http::body::RequestBodyFailed
    pub(crate) fn into_upload(mut self) -> Self {
        if let Kind::Streaming { upload, .. } = &mut self.kind {
            *upload = true;
        }
        self
    }

    /// A body that fails with `error` on its first read.
    pub(crate) fn failed(error: BoxError) -> Self {
        Self {
            kind: Kind::Failed { error: Some(error) },
        }
    }

    /// The whole body, if it is fully buffered (and not yet read).
    pub fn as_bytes(&self) -> Option<&Bytes> {
        static EMPTY: Bytes = Bytes::from_static(b"");
        match &self.kind {
            Kind::Full {
                data, read: false, ..
            } => Some(data.as_ref().unwrap_or(&EMPTY)),
            _ => None,
        }
    }

    /// `true` if the body is fully buffered.
    pub fn is_buffered(&self) -> bool {
        matches!(self.kind, Kind::Full { .. })
    }
}

impl<B> Default for BufferedBody<B> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<B> From<Bytes> for BufferedBody<B> {
    fn from(data: Bytes) -> Self {
        Self::full(data)
    }
}

impl<B> fmt::Debug for BufferedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full { data, trailers, .. } => f
                .debug_struct("BufferedBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .field("trailers", &trailers.is_some())
                .finish(),
            Kind::Streaming { prefix, .. } => f
                .debug_struct("BufferedBody::Streaming")
                .field("buffered_frames", &prefix.len())
                .finish(),
            Kind::Failed { .. } => f.write_str("BufferedBody::Failed"),
        }
    }
}

impl<B> Body for BufferedBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Full {
                data,
                trailers,
                read,
            } => {
                *read = true;
                Poll::Ready(
                    data.take()
                        .map(Frame::data)
                        .or_else(|| trailers.take().map(Frame::trailers))
                        .map(Ok),
                )
            }
            KindProj::Failed { error } => Poll::Ready(error.take().map(Err)),
            KindProj::Streaming {
                prefix,
                rest,
                upload,
                ended,
            } => {
                if let Some(frame) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if *ended {
                    return Poll::Ready(None);
                }
                let frame = ready!(rest.poll_frame(cx));
                *ended = !matches!(frame, Some(Ok(_)));
                match frame {
                    None => Poll::Ready(None),
                    Some(Ok(frame)) => Poll::Ready(Some(Ok(frame.map_data(into_bytes)))),
                    Some(Err(e)) if *upload => Poll::Ready(Some(Err(
                        crate::http::body::RequestBodyFailed::new(e).into(),
                    ))),
                    Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data, trailers, .. } => data.is_none() && trailers.is_none(),
            Kind::Failed { error } => error.is_none(),
            Kind::Streaming {
                prefix,
                rest,
                ended,
                ..
            } => prefix.is_empty() && (*ended || rest.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data, trailers, .. } => crate::http::body::buffered_size_hint(
                data.as_ref().map_or(0, |d| d.len() as u64),
                trailers.is_some(),
            ),
            Kind::Failed { .. } => SizeHint::default(),
            // Ended (its frames all sent before it was polled again): nothing more.
            Kind::Streaming { ended: true, .. } => SizeHint::with_exact(0),
            Kind::Streaming { prefix, rest, .. } => {
                let buffered: u64 = prefix
                    .iter()
                    .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                    .sum();
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(buffered));
                // Trailers still to come: no exact size, or hyper would send a
                // `content-length` and drop them (as for a buffered body).
                let trailers = prefix.iter().any(Frame::is_trailers);
                if let Some(upper) = inner.upper().filter(|_| !trailers) {
                    hint.set_upper(upper.saturating_add(buffered));
                }
                hint
            }
        }
    }
}

/// Converts any [`Buf`] into [`Bytes`] (zero-copy when it already is `Bytes`).
pub(crate) fn into_bytes<D: Buf>(mut data: D) -> Bytes {
    let len = data.remaining();
    data.copy_to_bytes(len)
}

/// A body being collected: a body of one data frame (the common case: a buffered
/// request or response) is kept as that frame's bytes, without a copy; only a second
/// frame starts a buffer.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    first: Option<Bytes>,
    rest: bytes::BytesMut,
}

impl Collected {
    /// The bytes collected so far.
    pub(crate) fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.rest.len()
    }

    fn push(&mut self, data: Bytes) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(data);
            return;
        }
        if let Some(first) = self.first.take() {
            self.rest.reserve(first.len() + data.len());
            self.rest.extend_from_slice(&first);
        }
        self.rest.extend_from_slice(&data);
    }

    /// The collected bytes.
    pub(crate) fn freeze(self) -> Bytes {
        self.first.unwrap_or_else(|| self.rest.freeze())
    }
}

/// Reads frames of `body` into `buf` until the end, the limit, or trailers.
///
/// `Ready(Ok(true))`: the whole body is in `buf`. `Ready(Ok(false))`: stop buffering;
/// `extra` holds the frame that did not fit (if any).
pub(crate) fn poll_collect<B>(
    mut body: Pin<&mut B>,
    cx: &mut Context<'_>,
    buf: &mut Collected,
    limit: usize,
    extra: &mut Option<Frame<Bytes>>,
) -> Poll<Result<bool, BoxError>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    loop {
        if body.is_end_stream() {
            return Poll::Ready(Ok(true));
        }
        match ready!(body.as_mut().poll_frame(cx)) {
            None => return Poll::Ready(Ok(true)),
            Some(Err(e)) => return Poll::Ready(Err(e.into())),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let data = into_bytes(data);
                    if buf.len() + data.len() > limit {
                        *extra = Some(Frame::data(data));
                        return Poll::Ready(Ok(false));
                    }
                    buf.push(data);
                }
                Err(frame) => {
                    // Trailers: an envelope cannot carry them.
                    *extra = frame.into_trailers().ok().map(Frame::trailers);
                    return Poll::Ready(Ok(false));
                }
            },
        }
    }
}

/// The partial body after [`poll_collect`] stopped early.
pub(crate) fn partial<B>(buf: Collected, extra: Option<Frame<Bytes>>, rest: B) -> BufferedBody<B> {
    let mut prefix = VecDeque::with_capacity(2);
    if buf.len() > 0 {
        prefix.push_back(Frame::data(buf.freeze()));
    }
    prefix.extend(extra);
    BufferedBody::resume(prefix, rest)
}

impl<B> crate::http::body::TryCloneBody for BufferedBody<B> {
    /// A copy when the body is fully buffered, so a retry layer inside
    /// [`EnqueueFallback`](super::EnqueueFallback) replays it without a second buffer;
    /// `None` for a streamed body, which is then sent exactly once, and for one
    /// already read from (what is left is not the whole body).
    fn try_clone_body(&self) -> Option<Self> {
        match &self.kind {
            Kind::Full {
                data,
                trailers,
                read: false,
            } => Some(Self::full_with_trailers(
                data.clone().unwrap_or_default(),
                trailers.clone(),
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn full_body_reports_exact_size_and_replays_bytes() {
        let body: BufferedBody<http_body_util::Empty<Bytes>> = BufferedBody::full("hello");
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(body.as_bytes().unwrap(), "hello");
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got, "hello");
    }

    /// With trailers the size is not exact: hyper would send `content-length` on
    /// HTTP/1.1 and drop them (a replayed gRPC answer's status).
    #[test]
    fn a_full_body_with_trailers_has_no_exact_size() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body: BufferedBody<http_body_util::Empty<Bytes>> =
            BufferedBody::full_with_trailers("hello", Some(trailers));
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(body.size_hint().lower(), 5);
    }

    /// A streamed body whose trailers are still to come (the collection stopped at
    /// them) has no exact size either, even when the rest of the body says it is empty.
    #[test]
    fn a_streamed_body_with_trailers_pending_has_no_exact_size() {
        let mut buf = Collected::default();
        buf.push(Bytes::from_static(b"abc"));
        let trailers = Frame::trailers(HeaderMap::new());
        let body = partial(buf, Some(trailers), http_body_util::Empty::<Bytes>::new());
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(body.size_hint().lower(), 3);
    }

    /// A buffered body read from is no longer copied (a copy was empty: a retry
    /// would have sent an empty body), nor given whole by `as_bytes`.
    #[tokio::test]
    async fn a_buffered_body_read_from_is_not_copied() {
        use crate::http::body::TryCloneBody;
        let mut body: BufferedBody<http_body_util::Empty<Bytes>> = BufferedBody::full("xyz");
        assert!(body.try_clone_body().is_some());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "xyz");
        assert!(body.try_clone_body().is_none());
        assert!(body.as_bytes().is_none());
    }

    /// A body that fails on its first read.
    struct Breaks;

    impl Body for Breaks {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Ready(Some(Err(std::io::ErrorKind::ConnectionReset.into())))
        }
    }

    /// The caller's upload breaking while it is streamed through is the caller's
    /// failure (`RequestBodyFailed`, ignored by the breakers), not the dependency's; a
    /// streamed response body's error is passed on as it is.
    #[tokio::test]
    async fn an_upload_that_breaks_is_the_callers_failure() {
        use crate::http::body::RequestBodyFailed;
        let upload = BufferedBody::streaming(Breaks).into_upload();
        let err = upload.collect().await.unwrap_err();
        assert!(
            crate::error::is_caused_by::<RequestBodyFailed>(&*err),
            "{err}"
        );
        assert!(crate::classify::classify_error(&*err).is_ignored());
        let response = BufferedBody::streaming(Breaks);
        let err = response.collect().await.unwrap_err();
        assert!(
            !crate::error::is_caused_by::<RequestBodyFailed>(&*err),
            "{err}"
        );
    }

    #[test]
    fn a_body_of_one_frame_is_collected_without_a_copy() {
        let frame = Bytes::from(vec![b'x'; 1024]);
        let mut buf = Collected::default();
        buf.push(frame.clone());
        let got = buf.freeze();
        assert_eq!(got.as_ptr(), frame.as_ptr(), "copied");
        let mut two = Collected::default();
        two.push(frame.clone());
        two.push(Bytes::from_static(b"y"));
        assert_eq!(two.len(), 1025);
        assert_eq!(two.freeze().slice(1023..), "xy");
    }

    #[tokio::test]
    async fn partial_body_yields_prefix_then_rest() {
        let rest = http_body_util::Full::new(Bytes::from_static(b" world"));
        let mut buf = Collected::default();
        buf.push(Bytes::from_static(b"he"));
        buf.push(Bytes::from_static(b"l"));
        let body = partial(buf, Some(Frame::data(Bytes::from_static(b"lo"))), rest);
        assert!(!body.is_buffered());
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got, "hello world");
    }
}
