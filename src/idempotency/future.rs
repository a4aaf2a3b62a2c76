//! Response future of [`Idempotency`](super::Idempotency).

use crate::enqueue::BufferedBody;
use http::Response;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

pub(crate) type KeyedFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

pin_project! {
    /// Response future of [`Idempotency`](super::Idempotency): the inner future as is for requests without
    /// a key (no allocation); one boxed future for requests with one.
    pub struct ResponseFuture<F, ResBody, E> {
        #[pin]
        kind: Kind<F, ResBody, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, ResBody, E> {
        Passthrough {
            #[pin]
            fut: F,
        },
        Keyed {
            fut: KeyedFuture<Response<BufferedBody<ResBody>>, E>,
        },
    }
}

// === impl ResponseFuture ===

impl<F, ResBody, E> ResponseFuture<F, ResBody, E> {
    pub(crate) fn passthrough(fut: F) -> Self {
        Self {
            kind: Kind::Passthrough { fut },
        }
    }

    pub(crate) fn keyed(fut: KeyedFuture<Response<BufferedBody<ResBody>>, E>) -> Self {
        Self {
            kind: Kind::Keyed { fut },
        }
    }
}

impl<F, ResBody, E> fmt::Debug for ResponseFuture<F, ResBody, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Keyed { .. } => "keyed",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F, ResBody, E>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<BufferedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { fut } => {
                let res = ready!(fut.poll(cx))?;
                Poll::Ready(Ok(res.map(BufferedBody::streaming)))
            }
            KindProj::Keyed { fut } => fut.as_mut().poll(cx),
        }
    }
}
