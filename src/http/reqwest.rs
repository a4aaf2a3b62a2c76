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
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
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
        // The request is in flight.
        Pending { #[pin] inner: Pending },
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
        match reqwest::Request::try_from(req.map(reqwest::Body::wrap)) {
            Ok(req) => ResponseFuture {
                state: State::Pending {
                    inner: self.client.call(req),
                },
            },
            Err(e) => ResponseFuture {
                state: State::Invalid { error: Some(e) },
            },
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<reqwest::Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Pending { inner } => {
                let res = ready!(inner.poll(cx)).map_err(redacted)?;
                Poll::Ready(Ok(res.into()))
            }
            StateProj::Invalid { error } => Poll::Ready(Err(redacted(
                error
                    .take()
                    .expect("reqwest future polled after completion"),
            )
            .into())),
        }
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
