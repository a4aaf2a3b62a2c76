//! `reqwest::Client` as a `tower::Service<http::Request<B>>`, so every postbox layer
//! applies to it and classification works on its `http::Response`s.
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//! use postbox::http::reqwest::ReqwestService;
//! use postbox::timeout::AttemptTimeoutLayer;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # async fn run() -> Result<(), postbox::BoxError> {
//! let client = ServiceBuilder::new()
//!     .layer(AttemptTimeoutLayer::new(Duration::from_millis(300))?)
//!     .service(ReqwestService::new(reqwest::Client::new()));
//! let req = http::Request::post("http://127.0.0.1:8080/orders").body(String::from("{}"))?;
//! let res = client.oneshot(req).await?;
//! println!("{}", res.status());
//! # Ok(()) }
//! ```

use crate::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use tower_service::Service;

/// A `reqwest::Client` serving `http::Request<B>` for any body `B`.
///
/// The response is an `http::Response<reqwest::Body>`; errors are `reqwest::Error`s
/// boxed into [`BoxError`] (a refused connection keeps its `io::Error` in the source
/// chain, so [`classify_error`](crate::classify::classify_error) sees it as a connect
/// failure that never took effect). An error's URL, which reqwest prints with it
/// (`… for url (…)`), has its userinfo and the values of query parameters named like
/// credentials (`api_key`, `access_token`, `X-Amz-Signature`, `sig`, …) redacted: the
/// enqueue fallback logs the error, and the replayer stores it as a dead letter's
/// reason.
///
/// Credentials in the URL (`https://user:token@host/…`) are sent as `Authorization:
/// Basic` (unless the request has an `Authorization` header) and taken out of the URL,
/// as reqwest's own `RequestBuilder` does.
///
/// A request with a body that fails after reqwest began to send that body comes back as
/// [`FailedAfterSending`] (the `reqwest::Error` its source): a client following
/// redirects (reqwest's default) sends a `POST` answered `303` on as a `GET`, and that
/// hop's failure to connect is no sign the `POST` was never sent. Without the wrapper,
/// it read as a connect failure that never took effect, and a retry sent the `POST`
/// again. A request without a body has no such mark: a client for calls that must not
/// be repeated is best built with `redirect(reqwest::redirect::Policy::none())`.
#[derive(Debug, Clone, Default)]
pub struct ReqwestService {
    client: reqwest::Client,
}

impl ReqwestService {
    /// Wraps `client`.
    pub fn new(client: reqwest::Client) -> Self {
        Self { client }
    }

    /// The client.
    pub fn get_ref(&self) -> &reqwest::Client {
        &self.client
    }

    /// Consumes the wrapper, returning the client.
    pub fn into_inner(self) -> reqwest::Client {
        self.client
    }
}

type Pending = <reqwest::Client as Service<reqwest::Request>>::Future;

pin_project! {
    /// Response future of [`ReqwestService`].
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        // The request is in flight (`sent`: its body was read).
        Pending { #[pin] inner: Pending, sent: Option<Arc<AtomicBool>> },
        // The request could not be built (e.g. a relative URI).
        Invalid { error: Option<reqwest::Error> },
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<B> Service<http::Request<B>> for ReqwestService
where
    B: http_body::Body + Send + Sync + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<reqwest::Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // hyper reads a body only once the request's head went out on a connection.
        let sent = (!req.body().is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
        let req = match &sent {
            Some(sent) => req.map(|inner| {
                reqwest::Body::wrap(Marked {
                    inner,
                    sent: sent.clone(),
                })
            }),
            None => req.map(reqwest::Body::wrap),
        };
        match reqwest::Request::try_from(req) {
            Ok(mut req) => {
                credentials_to_header(&mut req);
                ResponseFuture {
                    state: State::Pending {
                        inner: self.client.call(req),
                        sent,
                    },
                }
            }
            Err(e) => ResponseFuture {
                state: State::Invalid { error: Some(e) },
            },
        }
    }
}

/// Moves credentials in the URL (`https://user:token@host/…`) into an
/// `Authorization: Basic` header (marked sensitive), unless the request has one, and out
/// of the URL, as reqwest's `RequestBuilder` does. A request converted from an
/// `http::Request` keeps them in the URL: a forward proxy (reqwest reads `HTTP_PROXY`)
/// was sent them in clear text, HTTP/2 put them in `:authority`, and the server never
/// saw them (a `401`).
fn credentials_to_header(req: &mut reqwest::Request) {
    let url = req.url();
    if url.username().is_empty() && url.password().is_none() {
        return;
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = decode(url.username());
    let password = url.password().map(decode);
    if !req.headers().contains_key(http::header::AUTHORIZATION) {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{user}:{}", password.unwrap_or_default()));
        if let Ok(mut value) = http::HeaderValue::from_str(&format!("Basic {token}")) {
            value.set_sensitive(true);
            req.headers_mut().insert(http::header::AUTHORIZATION, value);
        }
    }
    let url = req.url_mut();
    let _ = url.set_username("");
    let _ = url.set_password(None);
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<reqwest::Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Pending { inner, sent } => match ready!(inner.poll(cx)) {
                Ok(res) => Poll::Ready(Ok(res.into())),
                Err(e) if sent.as_ref().is_some_and(|s| s.load(Ordering::Acquire)) => {
                    Poll::Ready(Err(Box::new(FailedAfterSending(redacted(e)))))
                }
                Err(e) => Poll::Ready(Err(redacted(e).into())),
            },
            StateProj::Invalid { error } => Poll::Ready(Err(redacted(
                error
                    .take()
                    .expect("reqwest future polled after completion"),
            )
            .into())),
        }
    }
}

/// A request failed after its body began to be sent: the request reached a server, and
/// may have taken effect, whatever the error says (a redirect's next hop refusing its
/// connection, say). [`classify_error`](crate::classify::classify_error) reads it as a
/// failure that may have taken effect. The `reqwest::Error` is its `source()` (found
/// with [`find_cause`](crate::error::find_cause)); it prints as that error.
#[derive(Debug)]
pub struct FailedAfterSending(reqwest::Error);

impl FailedAfterSending {
    /// The reqwest error.
    pub fn get_ref(&self) -> &reqwest::Error {
        &self.0
    }
}

impl fmt::Display for FailedAfterSending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for FailedAfterSending {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

pin_project! {
    /// The caller's body, marking `sent` when it is first read.
    struct Marked<B> {
        #[pin]
        inner: B,
        sent: Arc<AtomicBool>,
    }
}

impl<B: Body> Body for Marked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        this.sent.store(true, Ordering::Release);
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `e` with its URL's userinfo removed and the values of its credential-like query
/// parameters replaced with `redacted` (see [`ReqwestService`]).
#[cold]
fn redacted(mut e: reqwest::Error) -> reqwest::Error {
    use crate::queue::envelope::{is_secret_param, redact_query};
    if let Some(url) = e.url_mut() {
        if url.password().is_some() || !url.username().is_empty() {
            let _ = url.set_password(None);
            let _ = url.set_username("");
        }
        if let Some(query) = url.query()
            && query.split(['&', ';']).any(|pair| {
                pair.split_once('=')
                    .is_some_and(|(n, _)| is_secret_param(n))
            })
        {
            let mut shown = String::with_capacity(query.len());
            redact_query(query, "redacted", &mut shown);
            url.set_query(Some(&shown));
        }
    }
    e
}
