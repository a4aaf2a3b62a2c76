//! Response futures of [`EnqueueFallback`](super::EnqueueFallback) and
//! [`Defer`](super::Defer).

use super::error::FailedResponse;
use super::policy::trigger;
use super::receipt::Deferred;
use super::service::{Capture, Pending, Shared};
use crate::BoxError;
use crate::classify::Classify;
use crate::queue::Queue;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

pin_project! {
    /// Response future of [`Defer`](super::Defer).
    pub struct DeferFuture<F, Q, C> {
        #[pin]
        state: DeferState<F>,
        shared: Arc<Shared<Q, C>>,
        // Kept synchronous only because the body was over `max_body`.
        too_large: bool,
    }
}

pin_project! {
    #[project = DeferProj]
    enum DeferState<F> {
        Calling {
            #[pin]
            fut: F,
            capture: Option<Capture>,
        },
        Enqueuing { pending: Pending },
        Done,
    }
}

// === impl DeferFuture ===

impl<F, Q, C> DeferFuture<F, Q, C> {
    pub(crate) fn new(fut: F, capture: Option<Capture>, shared: Arc<Shared<Q, C>>) -> Self {
        Self {
            state: DeferState::Calling { fut, capture },
            shared,
            too_large: false,
        }
    }

    /// Marks the request as kept synchronous only because its body was over
    /// `max_body` (see [`Shared::too_large_to_defer`]).
    pub(crate) fn body_too_large(mut self) -> Self {
        self.too_large = true;
        self
    }
}

impl<F, Q, C> fmt::Debug for DeferFuture<F, Q, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            DeferState::Calling { .. } => "calling",
            DeferState::Enqueuing { .. } => "enqueuing",
            DeferState::Done => "done",
        };
        f.debug_struct("DeferFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, Q, C, Res, E> Future for DeferFuture<F, Q, C>
where
    F: Future<Output = Result<Res, E>>,
    E: Into<BoxError>,
    Q: Queue,
    C: Classify<Res, BoxError>,
{
    type Output = Result<Deferred<Res>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                DeferProj::Calling { fut, capture } => {
                    let out = ready!(fut.poll(cx)).map_err(Into::into);
                    let Some(capture) = capture.take() else {
                        if *this.too_large {
                            this.shared.too_large_to_defer(out.as_ref());
                        }
                        this.state.set(DeferState::Done);
                        return Poll::Ready(out.map(Deferred::Completed));
                    };
                    let Some(t) = trigger(&this.shared.classifier, out.as_ref())
                        .filter(|t| this.shared.deliverable(&capture, t))
                    else {
                        this.state.set(DeferState::Done);
                        return Poll::Ready(out.map(Deferred::Completed));
                    };
                    let original = match out {
                        Err(e) => e,
                        Ok(_) => FailedResponse::new(
                            "a response classified as a retryable failure".into(),
                            t.not_before,
                        )
                        .into(),
                    };
                    let pending = this.shared.enqueue(capture, t, original);
                    this.state.set(DeferState::Enqueuing { pending });
                }
                DeferProj::Enqueuing { pending } => {
                    let res = ready!(pending.poll(cx));
                    this.state.set(DeferState::Done);
                    return Poll::Ready(res.map(Deferred::Enqueued).map_err(Into::into));
                }
                DeferProj::Done => panic!("DeferFuture polled after completion"),
            }
        }
    }
}

#[cfg(feature = "http")]
pub use self::http_future::ResponseFuture;

#[cfg(feature = "http")]
mod http_future {
    use super::*;
    use crate::enqueue::body::{BufferedBody, Collected, partial, poll_collect};
    use crate::enqueue::receipt::{
        DEFER_REASON_HEADER, DUPLICATE_HEADER, IDEMPOTENCY_KEY_HEADER, MESSAGE_ID_HEADER, Receipt,
        reason_str,
    };
    use http::{HeaderName, HeaderValue, Request, Response, StatusCode, request::Parts};
    use http_body::{Body, Frame};
    use tower_service::Service;

    pin_project! {
        /// Response future of [`EnqueueFallback`](crate::enqueue::EnqueueFallback).
        pub struct ResponseFuture<S, B, Q, C>
        where
            S: Service<Request<BufferedBody<B>>>,
        {
            #[pin]
            state: State<S, S::Future, B>,
            shared: Arc<Shared<Q, C>>,
            // Polled before: the call waited (for the body, for readiness).
            waited: bool,
            // Kept synchronous only because the body was over `max_body`.
            too_large: bool,
        }
    }

    pin_project! {
        #[project = StateProj]
        enum State<S, F, B> {
            // Reading the body (up to the limit) before the call; owns a clone of the
            // service, not yet readied.
            Collecting {
                svc: Option<S>,
                parts: Option<Parts>,
                body: Option<B>,
                buf: Collected,
                // The key, and whether it was made here (written into the headers only
                // if the body is kept).
                key: Option<(String, bool)>,
            },
            // Readying a clone of the inner service (after the body is read, if it had to
            // be: so a slow upload holds no permit or probe slot of the layers inside).
            Readying {
                svc: S,
                req: Option<Request<BufferedBody<B>>>,
                capture: Option<Capture>,
            },
            Calling {
                #[pin]
                fut: F,
                capture: Option<Capture>,
            },
            Enqueuing { pending: Pending },
            Done,
        }
    }

    // === impl ResponseFuture ===

    impl<S, B, Q, C> ResponseFuture<S, B, Q, C>
    where
        S: Service<Request<BufferedBody<B>>>,
    {
        /// Readies `svc` (a clone of the inner service), then calls it with `req`.
        pub(crate) fn readying(
            svc: S,
            req: Request<BufferedBody<B>>,
            capture: Option<Capture>,
            shared: Arc<Shared<Q, C>>,
        ) -> Self {
            Self {
                state: State::Readying {
                    svc,
                    req: Some(req),
                    capture,
                },
                shared,
                waited: false,
                too_large: false,
            }
        }

        /// Marks the request as kept synchronous only because its body was over
        /// `max_body` (see [`Shared::too_large_to_defer`]).
        pub(crate) fn body_too_large(mut self) -> Self {
            self.too_large = true;
            self
        }

        pub(crate) fn collecting(
            svc: S,
            parts: Parts,
            body: B,
            key: (String, bool),
            shared: Arc<Shared<Q, C>>,
        ) -> Self {
            Self {
                state: State::Collecting {
                    svc: Some(svc),
                    parts: Some(parts),
                    body: Some(body),
                    buf: Collected::default(),
                    key: Some(key),
                },
                shared,
                waited: false,
                too_large: false,
            }
        }
    }

    impl<S, B, Q, C> fmt::Debug for ResponseFuture<S, B, Q, C>
    where
        S: Service<Request<BufferedBody<B>>>,
    {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let state = match &self.state {
                State::Collecting { .. } => "collecting",
                State::Readying { .. } => "readying",
                State::Calling { .. } => "calling",
                State::Enqueuing { .. } => "enqueuing",
                State::Done => "done",
            };
            f.debug_struct("ResponseFuture")
                .field("state", &state)
                .finish()
        }
    }

    /// The `202 Accepted` receipt response.
    fn receipt_response<ResBody: Default>(receipt: Receipt) -> Response<ResBody> {
        let mut res = Response::new(ResBody::default());
        *res.status_mut() = StatusCode::ACCEPTED;
        let headers = res.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&receipt.id().to_string()) {
            headers.insert(HeaderName::from_static(MESSAGE_ID_HEADER), v);
        }
        if let Ok(v) = HeaderValue::from_str(receipt.idempotency_key()) {
            headers.insert(HeaderName::from_static(IDEMPOTENCY_KEY_HEADER), v);
        }
        headers.insert(
            HeaderName::from_static(DEFER_REASON_HEADER),
            HeaderValue::from_static(reason_str(receipt.reason())),
        );
        if receipt.is_duplicate() {
            headers.insert(
                HeaderName::from_static(DUPLICATE_HEADER),
                HeaderValue::from_static("true"),
            );
        }
        res.extensions_mut().insert(receipt);
        res
    }

    /// The outcome of the call (or of readying the service): stored, when it triggers
    /// a deferral of a captured request (`Ok`, the store in progress), else returned as
    /// it is (`Err`).
    fn defer_or_return<Q, C, ResBody>(
        shared: &Arc<Shared<Q, C>>,
        capture: Option<Capture>,
        too_large: bool,
        out: Result<Response<ResBody>, BoxError>,
    ) -> Result<Pending, Result<Response<ResBody>, BoxError>>
    where
        Q: Queue,
        C: Classify<Response<ResBody>, BoxError>,
    {
        let Some(capture) = capture else {
            if too_large {
                shared.too_large_to_defer(out.as_ref());
            }
            return Err(out);
        };
        let Some(t) =
            trigger(&shared.classifier, out.as_ref()).filter(|t| shared.deliverable(&capture, t))
        else {
            return Err(out);
        };
        let original = match out {
            Err(e) => e,
            Ok(res) => FailedResponse::new(res.status().to_string(), t.not_before).into(),
        };
        Ok(shared.enqueue(capture, t, original))
    }

    impl<S, B, Q, C, ResBody> Future for ResponseFuture<S, B, Q, C>
    where
        S: Service<Request<BufferedBody<B>>, Response = Response<ResBody>>,
        S::Error: Into<BoxError>,
        B: Body + Unpin,
        B::Error: Into<BoxError>,
        ResBody: Default,
        Q: Queue,
        C: Classify<Response<ResBody>, BoxError>,
    {
        type Output = Result<Response<ResBody>, BoxError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let mut this = self.project();
            let waited = std::mem::replace(this.waited, true);
            loop {
                match this.state.as_mut().project() {
                    StateProj::Collecting {
                        svc,
                        parts,
                        body,
                        buf,
                        key,
                    } => {
                        let limit = this.shared.config.max_body;
                        let mut extra: Option<Frame<bytes::Bytes>> = None;
                        let b = body.as_mut().expect("body present while collecting");
                        let res = ready!(poll_collect(Pin::new(b), cx, buf, limit, &mut extra));
                        let svc = svc.take().expect("service present while collecting");
                        let parts = parts.take().expect("parts present while collecting");
                        let body = body.take().expect("body present while collecting");
                        let buf = std::mem::take(buf);
                        let (key, made) = key.take().expect("key present while collecting");
                        let (req, capture) = match res {
                            Err(e) => {
                                // The caller's upload broke while it was read to be
                                // kept: its failure, not the dependency's (a breaker or
                                // retry outside counts `RequestBodyFailed` nowhere).
                                this.state.set(State::Done);
                                return Poll::Ready(Err(
                                    crate::http::body::RequestBodyFailed::new(e).into(),
                                ));
                            }
                            Ok(true) => {
                                let mut parts = parts;
                                crate::enqueue::codec::http_codec::send_key(
                                    &mut parts.headers,
                                    &key,
                                    made,
                                );
                                let bytes = buf.freeze();
                                let capture = Capture::http(key, &parts, bytes.clone());
                                let held = crate::http::body::HeldWhole(bytes.len());
                                let mut req = Request::from_parts(parts, BufferedBody::full(bytes));
                                // Held whole: the retry inside replays it, however
                                // small its own buffer.
                                req.extensions_mut().insert(held);
                                (req, Some(capture))
                            }
                            Ok(false) => {
                                tracing::debug!(
                                    limit,
                                    "request body over the limit; not deferrable"
                                );
                                *this.too_large = true;
                                let req = Request::from_parts(
                                    parts,
                                    partial(buf, extra, body).into_upload(),
                                );
                                (req, None)
                            }
                        };
                        this.state.set(State::Readying {
                            svc,
                            req: Some(req),
                            capture,
                        });
                    }
                    StateProj::Readying { svc, req, capture } => {
                        if let Err(e) = ready!(svc.poll_ready(cx)) {
                            // Judged like a failed call (a closed `Buffer`, a `Reconnect`
                            // that cannot connect): nothing was sent.
                            let capture = capture.take();
                            match defer_or_return(
                                this.shared,
                                capture,
                                *this.too_large,
                                Err(e.into()),
                            ) {
                                Ok(pending) => this.state.set(State::Enqueuing { pending }),
                                Err(out) => {
                                    this.state.set(State::Done);
                                    return Poll::Ready(out);
                                }
                            }
                            continue;
                        }
                        let mut req = req.take().expect("request present while readying");
                        if waited {
                            // Deadline headers written outside before the wait tell the
                            // next hop more time than is left.
                            crate::timeout::refresh_stale_deadline_headers(&mut req);
                        }
                        let capture = capture.take();
                        let fut = svc.call(req);
                        this.state.set(State::Calling { fut, capture });
                    }
                    StateProj::Calling { fut, capture } => {
                        let out = ready!(fut.poll(cx)).map_err(Into::into);
                        match defer_or_return(this.shared, capture.take(), *this.too_large, out) {
                            Ok(pending) => this.state.set(State::Enqueuing { pending }),
                            Err(out) => {
                                this.state.set(State::Done);
                                return Poll::Ready(out);
                            }
                        }
                    }
                    StateProj::Enqueuing { pending } => {
                        let res = ready!(pending.poll(cx));
                        this.state.set(State::Done);
                        return Poll::Ready(match res {
                            Ok(receipt) => Ok(receipt_response(receipt)),
                            Err(e) => Err(e.into()),
                        });
                    }
                    StateProj::Done => panic!("EnqueueFallback future polled after completion"),
                }
            }
        }
    }
}
