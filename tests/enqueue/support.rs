//! Helpers for the enqueue tests.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use postbox::BoxError;
use postbox::enqueue::BufferedBody;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

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

/// A boxed error from anything.
pub(crate) fn boxed(e: impl Into<BoxError>) -> BoxError {
    e.into()
}
