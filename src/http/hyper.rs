//! hyper-util's legacy client behind the postbox stack.
//!
//! `hyper_util::client::legacy::Client` already is a `tower::Service<http::Request<B>>`,
//! so every postbox layer applies to it as it is. The only glue is classification:
//! this module implements [`AsError`] for its error type, so [`HttpClassifier`] and
//! [`GrpcClassifier`](crate::classify::GrpcClassifier) classify its errors directly —
//! a failure to connect (`is_connect()`: refused, DNS, a connect timeout, TLS) is a
//! retryable failure that never took effect, and so is a request it dropped before
//! dispatching it (a `hyper::Error` that `is_canceled()`: its connection closed). With a body buffered by
//! [`BufferBodyLayer`](crate::http::body::BufferBodyLayer) the client's body type is
//! `ReplayBody<B>`, which hyper sends like any other body.
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use postbox::circuit_breaker::CircuitBreakerLayer;
//! use postbox::classify::HttpClassifier;
//! use postbox::timeout::AttemptTimeoutLayer;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # async fn run() -> Result<(), postbox::BoxError> {
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let stack = ServiceBuilder::new()
//!     .layer(CircuitBreakerLayer::new().with_classifier(HttpClassifier::new()))
//!     .layer(AttemptTimeoutLayer::new(Duration::from_millis(300))?)
//!     .service(client);
//! let req = http::Request::get("http://127.0.0.1:8080/health").body(Full::default())?;
//! let res = stack.oneshot(req).await?;
//! println!("{}", res.status());
//! # Ok(()) }
//! ```
//!
//! [`HttpClassifier`]: crate::classify::HttpClassifier

use crate::classify::AsError;
use std::error::Error;

impl AsError for hyper_util::client::legacy::Error {
    /// The error itself: [`classify_error`](crate::classify::classify_error) walks its
    /// source chain (a connect error keeps its `io::Error`).
    fn as_error(&self) -> Option<&(dyn Error + 'static)> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use crate::classify::{Class, Classify, HttpClassifier};
    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    /// A connect error without an `io::Error` in its chain (here, a scheme the
    /// connector refuses; DNS failures and connect timeouts alike) never sent the
    /// request: no effect, so a `POST` may be retried. It counted as "may have taken
    /// effect".
    #[tokio::test]
    async fn any_connect_error_is_classified_without_effect() {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let err = client
            .get("https://127.0.0.1:9/".parse().unwrap())
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        let c = Classify::<http::Response<()>, _>::classify(&HttpClassifier::new(), Err(&err));
        assert!(c.is_retryable());
        assert!(!c.may_have_taken_effect());
    }

    #[tokio::test]
    async fn a_refused_connection_is_classified_without_effect() {
        // Bound but not listening, and held: refused, and no other test takes the port
        // (a listener bound and dropped left it free to be taken meanwhile).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let err = client
            .get(format!("http://{addr}/").parse().unwrap())
            .await
            .unwrap_err();
        let c = Classify::<http::Response<()>, _>::classify(&HttpClassifier::new(), Err(&err));
        assert_eq!(c.class(), Class::Failure);
        assert!(c.is_retryable());
        assert!(!c.may_have_taken_effect());
    }
}
