//! The response body of [`GrpcStatus`](super::GrpcStatus).

use super::{GrpcOutcome, OnGrpcStatus};
use crate::BoxError;
use crate::classify::GrpcClassifier;
use crate::classify::grpc::GrpcCode;
use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

pin_project! {
    /// The response body of [`GrpcStatus`](super::GrpcStatus): either the whole body,
    /// already read (its status is known), or the rest of a stream too long to buffer,
    /// classified from its trailers when it ends.
    ///
    /// A streamed body reports its final [`GrpcOutcome`] to the layer's
    /// [`OnGrpcStatus`] hook when the trailers arrive (or when it ends or fails without
    /// them). Dropping it before the end reports nothing.
    pub struct GrpcStatusBody<B, H = ()> {
        #[pin]
        kind: Kind<B, H>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B, H> {
        Buffered {
            data: Option<Bytes>,
            trailers: Option<HeaderMap>,
        },
        Streaming {
            prefix: Option<Bytes>,
            #[pin]
            inner: B,
            report: Option<Report<H>>,
            done: bool,
        },
    }
}

/// What a streamed body needs to classify and report its end.
pub(crate) struct Report<H> {
    pub(crate) classifier: GrpcClassifier,
    pub(crate) hook: Arc<H>,
    /// Binary gRPC-Web: its status is in a trailers frame at the end of the body.
    pub(crate) web: Option<WebScan>,
}

impl<H: OnGrpcStatus> Report<H> {
    /// The end of the body: its status from the gRPC-Web trailers frame if it had one.
    fn end(mut self) {
        let trailers = self.web.take().and_then(WebScan::trailers);
        self.trailers(trailers.as_ref());
    }

    fn trailers(self, trailers: Option<&HeaderMap>) {
        let code = trailers
            .and_then(GrpcCode::from_headers)
            .unwrap_or(GrpcCode::Unknown);
        let classification = self.classifier.classify_trailers(trailers);
        self.hook
            .on_grpc_status(&GrpcOutcome::new(code, classification, true));
    }

    fn error(self, err: &BoxError) {
        self.hook
            .on_grpc_status(&error_outcome(err, &self.classifier, true));
    }
}

/// Follows the frames of a streamed binary gRPC-Web body (a 5-byte head: flags and a
/// big-endian length, then the payload) to keep its first trailers frame (flag `0x80`),
/// which carries the status; anything after it is ignored, as for a buffered answer.
/// Message payloads are skipped, not copied.
#[derive(Debug, Default)]
pub(crate) struct WebScan {
    head: [u8; 5],
    /// Bytes of `head` read so far.
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The trailers frame's payload, once its head was read.
    trailers: Option<Vec<u8>>,
    /// A trailers frame longer than [`WebScan::MAX_TRAILERS`].
    spoiled: bool,
}

impl WebScan {
    /// The longest trailers frame kept (trailers are a few short lines; the layer's
    /// default limit for a buffered answer).
    const MAX_TRAILERS: usize = 64 * 1024;

    /// A scanner for a response whose headers say binary gRPC-Web.
    pub(crate) fn for_response(headers: &HeaderMap) -> Option<Self> {
        crate::classify::grpc::is_binary_web(headers).then(Self::default)
    }

    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.spoiled {
            if self.left > 0 {
                let n = self.left.min(data.len());
                if let Some(t) = &mut self.trailers {
                    t.extend_from_slice(&data[..n]);
                }
                self.left -= n;
                data = &data[n..];
                continue;
            }
            if self.trailers.is_some() {
                // The trailers frame is whole: what follows is not read.
                return;
            }
            let n = (self.head.len() - self.have).min(data.len());
            self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == self.head.len() {
                self.have = 0;
                let [flags, a, b, c, d] = self.head;
                let len = u32::from_be_bytes([a, b, c, d]);
                self.left = usize::try_from(len).unwrap_or(usize::MAX);
                if flags & 0x80 != 0 {
                    if self.left > Self::MAX_TRAILERS {
                        self.spoiled = true;
                        return;
                    }
                    self.trailers = Some(Vec::with_capacity(self.left));
                }
            }
        }
    }

    /// The trailers, if the body ended with a whole trailers frame.
    pub(crate) fn trailers(self) -> Option<HeaderMap> {
        if self.spoiled || self.left > 0 || self.have > 0 {
            return None;
        }
        self.trailers
            .map(|payload| crate::classify::grpc::web_trailer_lines(&payload))
    }
}

/// The outcome of a response whose body failed with `err`: tonic's bodies fail with a
/// `Status`; anything else is `UNKNOWN`. Classified by the layer's `classifier`, as a
/// status in the trailers is (its overrides apply to a code that came as an error).
pub(crate) fn error_outcome(
    err: &BoxError,
    classifier: &GrpcClassifier,
    streamed: bool,
) -> GrpcOutcome {
    use crate::classify::Classify;
    let code = crate::error::find_cause::<tonic::Status>(&**err)
        .map_or(GrpcCode::Unknown, |s| GrpcCode::from_i32(s.code() as i32));
    let class = Classify::<http::Response<()>, BoxError>::classify(classifier, Err(err));
    GrpcOutcome::new(code, class, streamed)
}

// === impl GrpcStatusBody ===

impl<B, H> GrpcStatusBody<B, H> {
    /// A body read in full: its data (if any), then its trailers (if any).
    pub(crate) fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Buffered {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// The bytes already read (`prefix`), then the rest of `inner`; `report` classifies
    /// the end of the stream.
    pub(crate) fn streaming(prefix: Bytes, inner: B, mut report: Option<Report<H>>) -> Self {
        if let Some(web) = report.as_mut().and_then(|r| r.web.as_mut()) {
            web.feed(&prefix);
        }
        Self {
            kind: Kind::Streaming {
                prefix: (!prefix.is_empty()).then_some(prefix),
                inner,
                report,
                done: false,
            },
        }
    }

    /// An empty body (a promoted trailers-only response).
    pub(crate) fn empty() -> Self {
        Self::buffered(Bytes::new(), None)
    }

    /// `true` when the whole body was read before the response was returned, so its
    /// gRPC status is final.
    pub fn is_buffered(&self) -> bool {
        matches!(self.kind, Kind::Buffered { .. })
    }
}

impl<B, H> fmt::Debug for GrpcStatusBody<B, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Buffered { data, trailers } => f
                .debug_struct("GrpcStatusBody::Buffered")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .field("trailers", &trailers.is_some())
                .finish(),
            Kind::Streaming { done, .. } => f
                .debug_struct("GrpcStatusBody::Streaming")
                .field("done", done)
                .finish_non_exhaustive(),
        }
    }
}

impl<B, H> Body for GrpcStatusBody<B, H>
where
    B: Body,
    B::Error: Into<BoxError>,
    H: OnGrpcStatus,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Buffered { data, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            KindProj::Streaming {
                prefix,
                inner,
                report,
                done,
            } => {
                if let Some(d) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                if *done {
                    return Poll::Ready(None);
                }
                match ready!(inner.poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        if let Some(t) = frame.trailers_ref()
                            && let Some(r) = report.take()
                        {
                            r.trailers(Some(t));
                        }
                        let frame = frame.map_data(|mut d| d.copy_to_bytes(d.remaining()));
                        if let Some(d) = frame.data_ref()
                            && let Some(web) = report.as_mut().and_then(|r| r.web.as_mut())
                        {
                            web.feed(d);
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(e)) => {
                        *done = true;
                        let e: BoxError = e.into();
                        if let Some(r) = report.take() {
                            r.error(&e);
                        }
                        Poll::Ready(Some(Err(e)))
                    }
                    None => {
                        *done = true;
                        if let Some(r) = report.take() {
                            r.end();
                        }
                        Poll::Ready(None)
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            // Not at its end while its outcome is unreported: a reader that stops at
            // the end of the stream would never make the poll that reports a stream
            // ending without trailers (`UNKNOWN`).
            Kind::Streaming {
                prefix,
                inner,
                report,
                done,
            } => *done || (prefix.is_none() && inner.is_end_stream() && report.is_none()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Buffered { data, trailers } => crate::http::body::buffered_size_hint(
                data.as_ref().map_or(0, Bytes::len) as u64,
                trailers.is_some(),
            ),
            Kind::Streaming {
                prefix,
                inner,
                done,
                ..
            } => {
                if *done {
                    return SizeHint::with_exact(0);
                }
                let have = prefix.as_ref().map_or(0, Bytes::len) as u64;
                let hint = inner.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower().saturating_add(have));
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper.saturating_add(have));
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With trailers to come the size is not exact: hyper would send `content-length`
    /// on HTTP/1.1 (gRPC-Web) and drop the trailers, the status among them.
    #[test]
    fn a_buffered_body_with_trailers_has_no_exact_size() {
        let data = Bytes::from_static(b"\0\0\0\0\x01a");
        let plain = GrpcStatusBody::<http_body_util::Empty<Bytes>>::buffered(data.clone(), None);
        assert_eq!(plain.size_hint().exact(), Some(6));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let with = GrpcStatusBody::<http_body_util::Empty<Bytes>>::buffered(data, Some(trailers));
        assert_eq!(with.size_hint().exact(), None);
        assert_eq!(with.size_hint().lower(), 6);
    }
}
