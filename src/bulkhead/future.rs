//! Response future of [`Bulkhead`](super::Bulkhead).

use super::error::Full;
use super::service::Permit;
use crate::BoxError;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

pin_project! {
    /// Response future of [`Bulkhead`](super::Bulkhead): carries the permit, released
    /// when the future completes or is dropped.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<F> {
        Running {
            #[pin]
            inner: F,
            permit: Option<Permit>,
        },
        Rejected { error: Option<Full> },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn running(inner: F, permit: Permit) -> Self {
        Self {
            kind: Kind::Running {
                inner,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn rejected(error: Full) -> Self {
        Self {
            kind: Kind::Rejected { error: Some(error) },
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Running { inner, permit } => {
                let out = ready!(inner.poll(cx));
                // Release the permit as soon as the call is done, not when the future
                // is dropped.
                drop(permit.take());
                Poll::Ready(out.map_err(Into::into))
            }
            KindProj::Rejected { error } => Poll::Ready(Err(error
                .take()
                .expect("bulkhead future polled after completion")
                .into())),
        }
    }
}
