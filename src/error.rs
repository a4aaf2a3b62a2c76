//! Errors shared by every layer: configuration errors, cause-chain helpers, and the
//! mappings of postbox's errors to HTTP responses (axum) and gRPC statuses (tonic).
//!
//! Every layer error is a struct named after its condition, found anywhere in a
//! `source()` chain with [`find_cause`]:
//!
//! | error | meaning | axum (`http`) | tonic (`grpc`) |
//! |---|---|---|---|
//! | [`circuit_breaker::error::Open`](crate::circuit_breaker::error::Open) | the breaker rejected the call | 503 + `Retry-After` | `UNAVAILABLE` + `grpc-retry-pushback-ms` |
//! | [`bulkhead::error::Full`](crate::bulkhead::error::Full) | no permit | 503 + `Retry-After: 1` | `RESOURCE_EXHAUSTED` + `grpc-retry-pushback-ms: 1000` |
//! | [`http::body::RequestBodyFailed`](crate::http::body::RequestBodyFailed) (`http`) | the caller's request body failed while it was read (a broken upload) | 400 | `CANCELLED` |
//! | the same, over a body limit set outside (`http_body_util::LengthLimitError`: tower-http's `RequestBodyLimitLayer`) | the caller's body is larger than the server takes | 413 | `RESOURCE_EXHAUSTED` |
//! | [`timeout::error::Elapsed`](crate::timeout::error::Elapsed) | attempt timed out | 504 | `DEADLINE_EXCEEDED` |
//! | [`timeout::error::DeadlineExceeded`](crate::timeout::error::DeadlineExceeded) | deadline passed | 504 | `DEADLINE_EXCEEDED` |
//! | [`timeout::error::BodyDeadlineExceeded`](crate::timeout::error::BodyDeadlineExceeded) | deadline passed while the response body was read (a body error: a proxy that had not sent its head yet answers 504) | 504 | `DEADLINE_EXCEEDED` |
//! | `tonic::TimeoutExpired` | a tonic `Channel` enforced the `grpc-timeout` it sent (tonic itself answers `CANCELLED`) | — | `DEADLINE_EXCEEDED` |
//! | a canceled `hyper::Error` | the call was dropped before it was dispatched, its connection closed (tonic itself answers `CANCELLED`) | — | `UNAVAILABLE` |
//!
//! The text sent with a full bulkhead is a fixed one (`bulkhead full`): its `Display`
//! names its capacity, which would tell a client how many slow requests fill it.
//!
//! `RequestBodyFailed` is taken for the incoming request's body (a proxy, or a handler,
//! that passes its caller's body on): a handler that sends an upstream a body of its
//! own (a file, a database stream) and maps the error with [`into_response`] answers
//! its caller `400` for that body's failure; it should map that case itself.
//!
//! # Example
//! ```
//! use postbox::{BoxError, bulkhead::error::Full, error::{find_cause, is_caused_by}};
//!
//! let err: BoxError = Full::new(8, 0).into();
//! assert!(is_caused_by::<Full>(&*err));
//! assert_eq!(find_cause::<Full>(&*err).unwrap().max_concurrent(), 8);
//! ```

use std::borrow::Cow;
use std::error::Error;
use std::fmt;

/// An invalid configuration, found when a layer is built. Names the offending field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: Cow<'static, str>,
    message: Cow<'static, str>,
}

impl ConfigError {
    /// An error about `field` (dotted path, e.g. `bulkhead.max_concurrent`).
    pub fn new(field: impl Into<Cow<'static, str>>, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The offending field.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: `{}` {}",
            self.field, self.message
        )
    }
}

impl Error for ConfigError {}

/// Finds an error of type `E` anywhere in `err`'s `source()` chain (itself included).
pub fn find_cause<'a, E: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a E> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// `true` if an error of type `E` is anywhere in `err`'s `source()` chain.
pub fn is_caused_by<E: Error + 'static>(err: &(dyn Error + 'static)) -> bool {
    find_cause::<E>(err).is_some()
}

#[cfg(feature = "http")]
pub use self::http_mapping::{into_response, to_response};

#[cfg(feature = "http")]
mod http_mapping {
    use super::{dependency_hint, find_cause};
    use crate::BoxError;
    use crate::bulkhead::error::Full;
    use crate::circuit_breaker::error::Open;
    use crate::enqueue::error::NotEnqueued;
    use crate::http::body::RequestBodyFailed;
    use crate::timeout::error::{BodyDeadlineExceeded, DeadlineExceeded, Elapsed};
    use axum_core::body::Body;
    use axum_core::response::{IntoResponse, Response};
    use http::{HeaderValue, StatusCode, header::RETRY_AFTER};
    use std::error::Error;
    use std::time::Duration;

    fn respond(status: StatusCode, retry_after: Option<Duration>, msg: String) -> Response {
        let mut res = Response::new(Body::from(msg));
        *res.status_mut() = status;
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(d) = retry_after {
            // Whole seconds, rounded up: a client that honours it is never early. At
            // most `i32::MAX` (68 years): a client parsing a 32- or 64-bit signed number
            // would drop a longer one, and retry at once.
            let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
            let secs = secs.clamp(1, i32::MAX as u64);
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }

    impl IntoResponse for Open {
        /// `503 Service Unavailable` with `Retry-After` (seconds until the next probe,
        /// rounded up).
        fn into_response(self) -> Response {
            respond(
                StatusCode::SERVICE_UNAVAILABLE,
                Some(self.retry_after()),
                self.to_string(),
            )
        }
    }

    impl IntoResponse for Full {
        /// `503 Service Unavailable` with `Retry-After: 1`, and a fixed text: the
        /// error's own names the capacity, which would tell a client how many slow
        /// requests fill it.
        fn into_response(self) -> Response {
            respond(
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(1)),
                "bulkhead full".to_owned(),
            )
        }
    }

    impl IntoResponse for Elapsed {
        /// `504 Gateway Timeout`.
        fn into_response(self) -> Response {
            respond(StatusCode::GATEWAY_TIMEOUT, None, self.to_string())
        }
    }

    impl IntoResponse for DeadlineExceeded {
        /// `504 Gateway Timeout`.
        fn into_response(self) -> Response {
            respond(StatusCode::GATEWAY_TIMEOUT, None, self.to_string())
        }
    }

    impl IntoResponse for BodyDeadlineExceeded {
        /// `504 Gateway Timeout`.
        fn into_response(self) -> Response {
            respond(StatusCode::GATEWAY_TIMEOUT, None, self.to_string())
        }
    }

    impl IntoResponse for NotEnqueued {
        /// The original failure's mapping when it is a postbox error (an open breaker:
        /// `503` with `Retry-After`; a timeout: `504`), else `503 Service Unavailable`
        /// (with the dependency's hint as `Retry-After`: its `Retry-After`, or a gRPC
        /// `Status`'s `grpc-retry-pushback-ms`, if it sent one): the dependency failed
        /// in a way worth retrying and the request could not be deferred.
        fn into_response(self) -> Response {
            to_response(&self).unwrap_or_else(|| not_enqueued(&self))
        }
    }

    fn not_enqueued(e: &NotEnqueued) -> Response {
        // The error names the original failure (an upstream's address) and the queue's:
        // not sent to the client (the enqueue layer logged it at `warn` already).
        tracing::debug!(error = %e, "request failed and could not be deferred; answered 503");
        respond(
            StatusCode::SERVICE_UNAVAILABLE,
            dependency_hint(e),
            "the request failed and could not be deferred".to_owned(),
        )
    }

    /// The response for a postbox error found anywhere in `err`'s cause chain, or
    /// `None` if there is none. A [`NotEnqueued`] answers as its original failure
    /// does, or `503`.
    pub fn to_response(err: &(dyn Error + 'static)) -> Option<Response> {
        if let Some(e) = find_cause::<Open>(err) {
            return Some(e.clone().into_response());
        }
        if let Some(e) = find_cause::<Full>(err) {
            return Some(e.clone().into_response());
        }
        if let Some(e) = find_cause::<Elapsed>(err) {
            return Some(e.clone().into_response());
        }
        if let Some(e) = find_cause::<DeadlineExceeded>(err) {
            return Some(e.clone().into_response());
        }
        if let Some(e) = find_cause::<BodyDeadlineExceeded>(err) {
            return Some(e.clone().into_response());
        }
        if find_cause::<RequestBodyFailed>(err).is_some() {
            // Over a limit a layer outside set (tower-http's `RequestBodyLimitLayer`):
            // `413`, as without postbox.
            if find_cause::<http_body_util::LengthLimitError>(err).is_some() {
                return Some(respond(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    None,
                    "the request body is too large".to_owned(),
                ));
            }
            // The caller's upload broke (it went away): theirs, not a server error to
            // log at `error` and count among the 5xx.
            tracing::debug!(error = %err, "the request body failed; answered 400");
            return Some(respond(
                StatusCode::BAD_REQUEST,
                None,
                "the request body could not be read".to_owned(),
            ));
        }
        find_cause::<NotEnqueued>(err).map(not_enqueued)
    }

    /// The response for any error: a postbox error's mapping, or
    /// `500 Internal Server Error`. With axum's `HandleErrorLayer`, which takes an
    /// async function: `HandleErrorLayer::new(|e: BoxError| async move {
    /// postbox::error::into_response(e) })`.
    ///
    /// A 500's body is a fixed text: the error (an upstream's address, a file path) is
    /// logged at `error` level, not sent to the client.
    pub fn into_response(err: BoxError) -> Response {
        to_response(&*err).unwrap_or_else(|| {
            tracing::error!(error = %err, "unhandled error answered 500");
            respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "internal server error".to_owned(),
            )
        })
    }

    impl<E: Into<BoxError>> IntoResponse for crate::circuit_breaker::error::Error<E> {
        /// A rejection as [`Open`] does; an inner error as [`into_response`] does.
        fn into_response(self) -> Response {
            match self {
                Self::Open(open) => open.into_response(),
                Self::Inner(e) => into_response(e.into()),
            }
        }
    }
}

/// The dependency's own hint (its `Retry-After`, its gRPC pushback) on a call that
/// answered a failure and could not be deferred.
#[cfg(feature = "http")]
fn dependency_hint(e: &crate::enqueue::error::NotEnqueued) -> Option<std::time::Duration> {
    let hint = find_cause::<crate::enqueue::error::FailedResponse>(e)
        .and_then(crate::enqueue::error::FailedResponse::retry_after);
    // A generated client's failure: a `Status` with the server's pushback.
    #[cfg(feature = "grpc")]
    let hint = hint.or_else(|| {
        find_cause::<tonic::Status>(e)
            .and_then(|s| crate::classify::grpc::retry_pushback(s.metadata().as_ref()))
            .and_then(Result::ok)
    });
    hint
}

#[cfg(feature = "grpc")]
pub(crate) use self::grpc_mapping::known_status;
#[cfg(feature = "grpc")]
pub use self::grpc_mapping::to_status;

#[cfg(feature = "grpc")]
mod grpc_mapping {
    use super::{dependency_hint, find_cause};
    use crate::bulkhead::error::Full;
    use crate::circuit_breaker::error::Open;
    use crate::enqueue::error::NotEnqueued;
    use crate::timeout::error::{BodyDeadlineExceeded, DeadlineExceeded, Elapsed};
    use std::error::Error;
    use std::time::Duration;
    use tonic::{Code, Status};

    impl From<Open> for Status {
        /// `UNAVAILABLE`, with `grpc-retry-pushback-ms` set to the time until the next
        /// probe.
        fn from(e: Open) -> Self {
            let mut status = Status::new(Code::Unavailable, e.to_string());
            pushback(&mut status, e.retry_after());
            with_source(status, e)
        }
    }

    impl From<Full> for Status {
        /// `RESOURCE_EXHAUSTED`, with `grpc-retry-pushback-ms: 1000` (as HTTP's
        /// `Retry-After: 1`).
        fn from(e: Full) -> Self {
            // A fixed text, as over HTTP: the error's own names the capacity.
            let mut status = Status::new(Code::ResourceExhausted, "bulkhead full");
            pushback(&mut status, Duration::from_secs(1));
            with_source(status, e)
        }
    }

    /// Sets `grpc-retry-pushback-ms`, rounded up as `Retry-After` is: a client honouring
    /// it is never early. At most `i32::MAX` (24 days): grpc-java reads it as an `int`,
    /// and takes one it cannot parse for "do not retry".
    fn pushback(status: &mut Status, after: Duration) {
        let ms = after
            .as_nanos()
            .div_ceil(1_000_000)
            .clamp(1, i32::MAX as u128);
        if let Ok(v) = ms.to_string().parse() {
            status.metadata_mut().insert("grpc-retry-pushback-ms", v);
        }
    }

    impl From<Elapsed> for Status {
        /// `DEADLINE_EXCEEDED`.
        fn from(e: Elapsed) -> Self {
            with_source(Status::new(Code::DeadlineExceeded, e.to_string()), e)
        }
    }

    impl From<DeadlineExceeded> for Status {
        /// `DEADLINE_EXCEEDED`.
        fn from(e: DeadlineExceeded) -> Self {
            with_source(Status::new(Code::DeadlineExceeded, e.to_string()), e)
        }
    }

    impl From<BodyDeadlineExceeded> for Status {
        /// `DEADLINE_EXCEEDED`.
        fn from(e: BodyDeadlineExceeded) -> Self {
            with_source(Status::new(Code::DeadlineExceeded, e.to_string()), e)
        }
    }

    /// The status with our error as its source: layers outside that classify the
    /// `Status` (a breaker, a retry, an enqueue fallback) still find our own rejection
    /// in it, and do not count it as the dependency's failure.
    fn with_source(mut status: Status, e: impl Error + Send + Sync + 'static) -> Status {
        status.set_source(std::sync::Arc::new(e));
        status
    }

    impl<E: Into<crate::BoxError>> From<crate::circuit_breaker::error::Error<E>> for Status {
        /// A rejection as [`Open`] does; an inner error as
        /// [`into_status`](crate::grpc::into_status()) does: tonic's own mapping for a
        /// transport failure (a refused connect is `UNAVAILABLE`), the error kept as the
        /// status' source, so a classifier outside still sees a call that never left.
        fn from(e: crate::circuit_breaker::error::Error<E>) -> Self {
            match e {
                crate::circuit_breaker::error::Error::Open(open) => open.into(),
                crate::circuit_breaker::error::Error::Inner(e) => {
                    crate::grpc::into_status(e.into())
                }
            }
        }
    }

    impl From<NotEnqueued> for Status {
        /// As [`to_status`]: the original failure's mapping or its own `Status`, else
        /// `UNAVAILABLE`.
        fn from(e: NotEnqueued) -> Self {
            to_status(&e)
        }
    }

    /// The `tonic::Status` for any error: a postbox error's mapping, a `Status` found
    /// in the chain, `UNAVAILABLE` for a [`NotEnqueued`] with neither (the call failed
    /// in a way worth retrying and could not be deferred), or `UNKNOWN` with the
    /// error's message.
    pub fn to_status(err: &(dyn Error + 'static)) -> Status {
        known_status(err).unwrap_or_else(|| Status::unknown(err.to_string()))
    }

    /// [`to_status`] without its last resort: `None` for an error that is neither a
    /// postbox error, a `Status`, nor caused by one.
    pub(crate) fn known_status(err: &(dyn Error + 'static)) -> Option<Status> {
        if let Some(e) = find_cause::<Open>(err) {
            return Some(e.clone().into());
        }
        if let Some(e) = find_cause::<Full>(err) {
            return Some(e.clone().into());
        }
        if let Some(e) = find_cause::<Elapsed>(err) {
            return Some(e.clone().into());
        }
        if let Some(e) = find_cause::<DeadlineExceeded>(err) {
            return Some(e.clone().into());
        }
        if let Some(e) = find_cause::<BodyDeadlineExceeded>(err) {
            return Some(e.clone().into());
        }
        // A `Channel`'s own timeout (the `grpc-timeout` it sent): tonic's
        // `Status::from_error` makes it `CANCELLED`, under a status too.
        if find_cause::<tonic::TimeoutExpired>(err).is_some() {
            return Some(Status::deadline_exceeded("the call's deadline passed"));
        }
        // The call was dropped before it was dispatched, its connection closed
        // (tonic makes it `CANCELLED`): our caller cancelled nothing.
        if let Some(e) = find_cause::<hyper::Error>(err).filter(|e| e.is_canceled()) {
            // With a source that a classifier outside reads as never sent (a bare
            // `UNAVAILABLE` may have taken effect): hyper's error cannot be cloned.
            return Some(with_source(
                Status::unavailable(format!("the call was not sent: {e}")),
                crate::classify::NotDispatched,
            ));
        }
        if let Some(s) = find_cause::<Status>(err) {
            return Some(s.clone());
        }
        if find_cause::<crate::http::body::RequestBodyFailed>(err).is_some() {
            if find_cause::<http_body_util::LengthLimitError>(err).is_some() {
                return Some(Status::resource_exhausted("the request body is too large"));
            }
            // The caller's request stream broke: the caller went away.
            return Some(Status::cancelled("the request body could not be read"));
        }
        if let Some(e) = find_cause::<NotEnqueued>(err) {
            // Its text names the original failure (an upstream's address) and the
            // queue's (a file path): logged, not sent, as for HTTP.
            tracing::debug!(error = %e, "call failed and could not be deferred; answered UNAVAILABLE");
            let mut status = Status::unavailable("the call failed and could not be deferred");
            if let Some(after) = dependency_hint(e) {
                pushback(&mut status, after);
            }
            return Some(status);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxError;
    use crate::bulkhead::error::Full;
    use crate::circuit_breaker::error::Open;
    use crate::enqueue::error::NotEnqueued;
    use crate::timeout::error::{BodyDeadlineExceeded, DeadlineExceeded, Elapsed};
    use std::time::Duration;

    #[derive(Debug)]
    struct Outer(BoxError);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer")
        }
    }
    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn find_cause_walks_the_source_chain() {
        let err: BoxError = Box::new(Outer(Full::new(3, 0).into()));
        assert_eq!(find_cause::<Full>(&*err).unwrap().max_concurrent(), 3);
        assert!(!is_caused_by::<Open>(&*err));
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = ConfigError::new("retry.max_retries", "must be at most 100");
        assert_eq!(
            e.to_string(),
            "invalid configuration: `retry.max_retries` must be at most 100"
        );
    }

    #[cfg(feature = "http")]
    #[test]
    fn open_circuit_answers_503_with_retry_after_rounded_up() {
        let err: BoxError = Box::new(Outer(Open::new(Duration::from_millis(2100)).into()));
        let res = to_response(&*err).unwrap();
        assert_eq!(res.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[http::header::RETRY_AFTER], "3");
        assert_eq!(
            res.headers()[http::header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
    }

    #[cfg(feature = "http")]
    #[test]
    fn full_bulkhead_answers_503_and_timeouts_answer_504() {
        let full = into_response(Full::new(1, 0).into());
        assert_eq!(full.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(full.headers()[http::header::RETRY_AFTER], "1");
        let elapsed = into_response(Elapsed::new(Duration::from_secs(1)).into());
        assert_eq!(elapsed.status(), http::StatusCode::GATEWAY_TIMEOUT);
        let deadline = into_response(DeadlineExceeded::new(Duration::ZERO, true).into());
        assert_eq!(deadline.status(), http::StatusCode::GATEWAY_TIMEOUT);
        let body = into_response(BodyDeadlineExceeded::new().into());
        assert_eq!(body.status(), http::StatusCode::GATEWAY_TIMEOUT);
        let other = into_response("boom".into());
        assert_eq!(other.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[cfg(feature = "http")]
    #[test]
    fn breaker_errors_answer_as_their_cause() {
        use crate::circuit_breaker::error::Error as BreakerError;
        use axum_core::response::IntoResponse;
        let open = BreakerError::<BoxError>::Open(Open::new(Duration::from_secs(2)));
        let res = open.into_response();
        assert_eq!(res.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[http::header::RETRY_AFTER], "2");
        let inner = BreakerError::<BoxError>::Inner(Elapsed::new(Duration::from_secs(1)).into());
        assert_eq!(
            inner.into_response().status(),
            http::StatusCode::GATEWAY_TIMEOUT
        );
    }

    /// A status made from our own error keeps it as its source, so a layer outside that
    /// classifies the `Status` still sees our rejection, not the dependency's failure;
    /// the pushback is rounded up, never early.
    #[cfg(feature = "grpc")]
    #[test]
    fn a_status_from_our_error_keeps_it_as_its_source_and_rounds_pushback_up() {
        use crate::classify::{Class, classify_error};
        let status = to_status(&Outer(Open::new(Duration::from_micros(299_700)).into()));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "300"
        );
        let err: BoxError = status.into();
        assert!(is_caused_by::<Open>(&*err));
        assert_eq!(classify_error(&*err).class(), Class::Ignored);
        // A full bulkhead tells a gRPC client when to come back, as `Retry-After: 1`
        // tells an HTTP one.
        let full = tonic::Status::from(Full::new(1, 0));
        assert_eq!(
            full.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "1000"
        );
        let full: BoxError = full.into();
        assert_eq!(classify_error(&*full).class(), Class::Ignored);
        let before: BoxError =
            tonic::Status::from(DeadlineExceeded::new(Duration::ZERO, true)).into();
        assert!(!classify_error(&*before).may_have_taken_effect());
        let elapsed: BoxError = tonic::Status::from(Elapsed::new(Duration::from_secs(1))).into();
        assert!(is_caused_by::<Elapsed>(&*elapsed));
        let body = to_status(&Outer(BodyDeadlineExceeded::new().into()));
        assert_eq!(body.code(), tonic::Code::DeadlineExceeded);
    }

    /// A `NotEnqueued` for a retryable `503` answer that met a full queue, and one
    /// for an open breaker that met a full queue.
    fn not_enqueued() -> (NotEnqueued, NotEnqueued) {
        use crate::enqueue::error::FailedResponse;
        use crate::queue::{DeferReason, QueueError};
        let full = || QueueError::Full { capacity: 10 };
        (
            NotEnqueued::new(
                DeferReason::RetriesExhausted,
                Box::new(FailedResponse::new("503 Service Unavailable".into(), None)),
                full(),
            ),
            NotEnqueued::new(
                DeferReason::CircuitOpen,
                Box::new(Open::new(Duration::from_secs(2))),
                full(),
            ),
        )
    }

    /// A `NotEnqueued` for a `429 Retry-After: 120` answer that met a full queue.
    fn hinted_not_enqueued() -> NotEnqueued {
        use crate::enqueue::error::FailedResponse;
        use crate::queue::{DeferReason, QueueError};
        NotEnqueued::new(
            DeferReason::RetriesExhausted,
            Box::new(FailedResponse::new(
                "429 Too Many Requests".into(),
                Some(Duration::from_secs(120)),
            )),
            QueueError::Full { capacity: 10 },
        )
    }

    /// The dependency's hint at its longest (a `Retry-After` of 21 digits reads as
    /// `Duration::MAX`) is passed on as the longest a 32-bit signed number holds, not
    /// an overflow, nor a number a client parsing a signed one drops (and so retries
    /// at once).
    #[cfg(feature = "http")]
    #[test]
    fn the_longest_hint_of_a_request_not_enqueued_does_not_overflow() {
        use crate::enqueue::error::FailedResponse;
        use crate::queue::{DeferReason, QueueError};
        use axum_core::response::IntoResponse;
        let e = NotEnqueued::new(
            DeferReason::RetriesExhausted,
            Box::new(FailedResponse::new("429".into(), Some(Duration::MAX))),
            QueueError::Full { capacity: 1 },
        );
        let res = e.into_response();
        assert_eq!(
            res.headers()[http::header::RETRY_AFTER],
            i32::MAX.to_string().as_str()
        );
    }

    /// A generated client's failure that could not be deferred answers HTTP with the
    /// server's pushback as its `Retry-After`: a `RESOURCE_EXHAUSTED` asking for 30 s
    /// was answered `503` without one, and the caller retried at once.
    #[cfg(feature = "grpc")]
    #[test]
    fn a_status_not_enqueued_answers_http_with_its_pushback() {
        use crate::queue::{DeferReason, QueueError};
        use axum_core::response::IntoResponse;
        let mut status = tonic::Status::resource_exhausted("busy");
        status
            .metadata_mut()
            .insert("grpc-retry-pushback-ms", "30000".parse().unwrap());
        let e = NotEnqueued::new(
            DeferReason::RetriesExhausted,
            Box::new(status),
            QueueError::Full { capacity: 1 },
        );
        let res = e.into_response();
        assert_eq!(res.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[http::header::RETRY_AFTER], "30");
        // A negative pushback ("do not retry") gives no hint.
        let mut refused = tonic::Status::resource_exhausted("busy");
        refused
            .metadata_mut()
            .insert("grpc-retry-pushback-ms", "-1".parse().unwrap());
        let e = NotEnqueued::new(
            DeferReason::RetriesExhausted,
            Box::new(refused),
            QueueError::Full { capacity: 1 },
        );
        assert!(
            !e.into_response()
                .headers()
                .contains_key(http::header::RETRY_AFTER)
        );
    }

    /// The same hint as a gRPC pushback is at most `i32::MAX` ms: grpc-java reads the
    /// value as an `int`, and takes one it cannot parse for "do not retry".
    #[cfg(feature = "grpc")]
    #[test]
    fn the_longest_hint_as_a_grpc_pushback_fits_an_int() {
        use crate::enqueue::error::FailedResponse;
        use crate::queue::{DeferReason, QueueError};
        let e = NotEnqueued::new(
            DeferReason::RetriesExhausted,
            Box::new(FailedResponse::new("429".into(), Some(Duration::MAX))),
            QueueError::Full { capacity: 1 },
        );
        let status = to_status(&e);
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            i32::MAX.to_string().as_str()
        );
    }

    #[cfg(feature = "http")]
    #[test]
    fn a_request_not_enqueued_answers_as_its_original_failure_or_503() {
        use axum_core::response::IntoResponse;
        let (failed, open) = not_enqueued();
        let res = failed.into_response();
        assert_eq!(res.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(res.headers().get(http::header::RETRY_AFTER).is_none());
        let res = open.into_response();
        assert_eq!(res.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[http::header::RETRY_AFTER], "2");
        // The dependency's own `Retry-After` (a `429 Retry-After: 120` that met a full
        // queue) is passed on: the caller was told to retry at once.
        let res = hinted_not_enqueued().into_response();
        assert_eq!(res.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[http::header::RETRY_AFTER], "120");
        // Boxed in a chain, as a stack's error reaches `HandleErrorLayer`: not a 500.
        let (failed, _) = not_enqueued();
        let boxed: BoxError = Box::new(Outer(Box::new(failed)));
        assert_eq!(
            into_response(boxed).status(),
            http::StatusCode::SERVICE_UNAVAILABLE
        );
    }

    /// The 503 for a request that could not be deferred does not show the client the
    /// original failure's text (an upstream's address) or the queue's.
    #[cfg(feature = "http")]
    #[tokio::test]
    async fn a_request_not_enqueued_tells_the_client_nothing_internal() {
        use crate::enqueue::error::FailedResponse;
        use crate::queue::{DeferReason, QueueError};
        use axum_core::response::IntoResponse;
        let e = NotEnqueued::new(
            DeferReason::RetriesExhausted,
            Box::new(FailedResponse::new(
                "connect to 10.1.2.3:8080 refused".into(),
                None,
            )),
            QueueError::Unavailable("/var/lib/postbox/q.redb: disk full".into()),
        );
        let body = http_body_util::BodyExt::collect(e.into_response().into_body())
            .await
            .unwrap()
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("10.1.2.3") && !text.contains("redb"),
            "{text}"
        );
    }

    /// A caller's broken upload, anywhere in the chain, is answered `400` (gRPC:
    /// `CANCELLED`): the caller's, not a server error logged at `error` level and counted
    /// among the 5xx. (It was `500`, and gRPC `UNKNOWN`.)
    #[cfg(feature = "http")]
    #[test]
    fn a_broken_upload_answers_400_not_500() {
        use crate::http::body::RequestBodyFailed;
        let broken = || -> BoxError {
            Box::new(Outer(Box::new(RequestBodyFailed::new(
                std::io::Error::from(std::io::ErrorKind::ConnectionReset),
            ))))
        };
        assert_eq!(
            into_response(broken()).status(),
            http::StatusCode::BAD_REQUEST
        );
        #[cfg(feature = "grpc")]
        {
            assert_eq!(to_status(&*broken()).code(), tonic::Code::Cancelled);
            // The same through `IntoStatusLayer`'s mapping (it was `UNKNOWN`, with the
            // error's own text).
            assert_eq!(
                crate::grpc::into_status(broken()).code(),
                tonic::Code::Cancelled
            );
        }
    }

    /// A caller's body over a limit set outside (tower-http's `RequestBodyLimitLayer`,
    /// met while the fallback collects the body) is `413` (gRPC: `RESOURCE_EXHAUSTED`),
    /// as without postbox, not a broken upload's `400`.
    #[cfg(feature = "http")]
    #[tokio::test]
    async fn a_body_over_a_limit_set_outside_answers_413() {
        use crate::http::body::RequestBodyFailed;
        use http_body_util::{BodyExt, Full, Limited};
        let limited = || async {
            let body = Full::new(bytes::Bytes::from_static(b"0123456789"));
            Limited::new(body, 4).collect().await.unwrap_err()
        };
        let over: BoxError = Box::new(RequestBodyFailed::new(limited().await));
        #[cfg(feature = "grpc")]
        assert_eq!(to_status(&*over).code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            into_response(over).status(),
            http::StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    /// A full bulkhead's answer does not tell the client its capacity (how many slow
    /// requests fill it), over HTTP or gRPC.
    #[cfg(feature = "http")]
    #[tokio::test]
    async fn a_full_bulkhead_does_not_tell_its_capacity() {
        use axum_core::response::IntoResponse;
        for full in [
            Full::new(256, 0),
            Full::new(256, 0).after_waiting(Duration::from_millis(50)),
        ] {
            let body = http_body_util::BodyExt::collect(full.clone().into_response().into_body())
                .await
                .unwrap()
                .to_bytes();
            let text = String::from_utf8_lossy(&body);
            assert!(
                text.contains("bulkhead full") && !text.contains("256"),
                "{text}"
            );
            #[cfg(feature = "grpc")]
            assert!(!tonic::Status::from(full).message().contains("256"));
        }
    }

    /// The same for gRPC: the `UNAVAILABLE` message is fixed.
    #[cfg(feature = "grpc")]
    #[test]
    fn a_call_not_enqueued_tells_the_client_nothing_internal() {
        use crate::enqueue::error::FailedResponse;
        use crate::queue::{DeferReason, QueueError};
        let e = NotEnqueued::new(
            DeferReason::RetriesExhausted,
            Box::new(FailedResponse::new(
                "connect to 10.1.2.3:8080 refused".into(),
                None,
            )),
            QueueError::Unavailable("/var/lib/postbox/q.redb: disk full".into()),
        );
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let text = status.message();
        assert!(
            !text.contains("10.1.2.3") && !text.contains("redb"),
            "{text}"
        );
        // The dependency's own hint is passed on as the pushback.
        let status = tonic::Status::from(hinted_not_enqueued());
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "120000"
        );
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn a_request_not_enqueued_maps_to_its_original_status_or_unavailable() {
        let (failed, open) = not_enqueued();
        assert_eq!(tonic::Status::from(failed).code(), tonic::Code::Unavailable);
        let status = tonic::Status::from(open);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "2000"
        );
        let denied = NotEnqueued::new(
            crate::queue::DeferReason::DeadlineElapsed,
            Box::new(tonic::Status::resource_exhausted("quota")),
            crate::queue::QueueError::Full { capacity: 1 },
        );
        let boxed: BoxError = Box::new(Outer(Box::new(denied)));
        assert_eq!(to_status(&*boxed).code(), tonic::Code::ResourceExhausted);
        // `IntoStatusLayer`'s mapping too: not tonic's `UNKNOWN` for a failed response.
        let (failed, _) = not_enqueued();
        let boxed: BoxError = Box::new(Outer(Box::new(failed)));
        assert_eq!(
            crate::grpc::into_status(boxed).code(),
            tonic::Code::Unavailable
        );
    }

    #[cfg(feature = "grpc")]
    /// tonic answers its `Channel`'s own timeout `CANCELLED`; it is the call's
    /// deadline, `DEADLINE_EXCEEDED`, bare or under that status.
    #[test]
    fn a_channels_own_timeout_is_deadline_exceeded() {
        use crate::grpc::into_status;
        let status = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        for err in [BoxError::from(status), Box::new(tonic::TimeoutExpired(()))] {
            assert_eq!(into_status(err).code(), tonic::Code::DeadlineExceeded);
        }
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn breaker_errors_map_to_grpc_statuses() {
        use crate::circuit_breaker::error::Error as BreakerError;
        let open = tonic::Status::from(BreakerError::<BoxError>::Open(Open::new(
            Duration::from_millis(300),
        )));
        assert_eq!(open.code(), tonic::Code::Unavailable);
        let full = tonic::Status::from(BreakerError::<BoxError>::Inner(Full::new(1, 0).into()));
        assert_eq!(full.code(), tonic::Code::ResourceExhausted);
        // An inner transport failure keeps its cause: a refused connect is still a
        // call that never left, retried whatever the method, by a retry outside. (It
        // was `UNKNOWN` with only its message: a failure not to retry.)
        let refused = tonic::Status::from(BreakerError::<BoxError>::Inner(Box::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        )));
        let c = crate::classify::classify_error(&refused);
        assert!(c.is_retryable() && !c.may_have_taken_effect(), "{c:?}");
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn errors_map_to_grpc_statuses() {
        use tonic::Code;
        let open = to_status(&Open::new(Duration::from_millis(1500)));
        assert_eq!(open.code(), Code::Unavailable);
        assert_eq!(
            open.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "1500"
        );
        assert_eq!(to_status(&Full::new(1, 0)).code(), Code::ResourceExhausted);
        assert_eq!(
            to_status(&Elapsed::new(Duration::from_secs(1))).code(),
            Code::DeadlineExceeded
        );
        let wrapped: BoxError = Box::new(Outer(Box::new(tonic::Status::not_found("gone"))));
        assert_eq!(to_status(&*wrapped).code(), Code::NotFound);
    }
}
