//! Classification of errors: transport, connect, our own timeouts and rejections.

use super::Classification;
use crate::BoxError;
use std::error::Error;
use std::io;

/// Gives access to an error as `&dyn Error`, so classifiers can walk its `source()`
/// chain.
///
/// Implemented for [`BoxError`] (what most tower stacks carry), [`std::io::Error`],
/// [`std::convert::Infallible`], postbox's own errors and, with the `grpc` feature,
/// `tonic::Status`. For another error type `E: Error + 'static` the implementation
/// is one line: `fn as_error(&self) -> Option<&(dyn Error + 'static)> { Some(self) }`.
pub trait AsError {
    /// The error as a trait object, or `None` if it can never occur.
    fn as_error(&self) -> Option<&(dyn Error + 'static)>;
}

impl AsError for BoxError {
    fn as_error(&self) -> Option<&(dyn Error + 'static)> {
        Some(&**self)
    }
}

impl AsError for io::Error {
    fn as_error(&self) -> Option<&(dyn Error + 'static)> {
        Some(self)
    }
}

impl AsError for std::convert::Infallible {
    fn as_error(&self) -> Option<&(dyn Error + 'static)> {
        match *self {}
    }
}

#[cfg(feature = "grpc")]
impl AsError for tonic::Status {
    fn as_error(&self) -> Option<&(dyn Error + 'static)> {
        Some(self)
    }
}

macro_rules! as_error_for {
    ($($t:ty),* $(,)?) => {$(
        impl AsError for $t {
            fn as_error(&self) -> Option<&(dyn Error + 'static)> { Some(self) }
        }
    )*};
}

as_error_for!(
    crate::timeout::error::Elapsed,
    crate::timeout::error::DeadlineExceeded,
    crate::timeout::error::BodyDeadlineExceeded,
    crate::bulkhead::error::Full,
    crate::circuit_breaker::error::Open,
);

/// Classifies an error by walking its `source()` chain.
///
/// | error found in the chain | class | retryable | may have taken effect |
/// |---|---|---|---|
/// | ✦ [`circuit_breaker::error::Open`](crate::circuit_breaker::error::Open) | ignored | yes, after its `retry_after` | no |
/// | ✦ the same, from a breaker [forced open](crate::circuit_breaker::error::Open::is_forced) (no end to wait for) | ignored | no | no |
/// | ✦ [`bulkhead::error::Full`](crate::bulkhead::error::Full) | ignored | yes | no |
/// | ✦ `http::body::RequestBodyFailed` (with `http`: the caller's upload broke; not seen behind an HTTP/2 client, which drops it) | ignored | no | yes |
/// | ✦ [`timeout::error::Elapsed`](crate::timeout::error::Elapsed) (attempt timeout) | failure | yes | yes |
/// | ✦ `tonic::TimeoutExpired` (with `grpc`: a `Channel`'s own timeout, which tonic reports as `CANCELLED`) | failure | yes | yes |
/// | ✦ a `hyper::Error` that [`is_canceled`](https://docs.rs/hyper/1/hyper/struct.Error.html#method.is_canceled) (with `grpc`, `hyper` or `reqwest`: the request was dropped before it was dispatched, its connection closed; tonic reports it as `CANCELLED`) | failure | yes | no |
/// | ✦ [`timeout::error::DeadlineExceeded`](crate::timeout::error::DeadlineExceeded) that expired before the call (no attempt was made) | ignored | no (the budget is spent) | no |
/// | ✦ [`timeout::error::DeadlineExceeded`](crate::timeout::error::DeadlineExceeded), the call made | failure | no (the budget is spent) | yes |
/// | ✦ [`timeout::error::BodyDeadlineExceeded`](crate::timeout::error::BodyDeadlineExceeded) (the answer's body stalled) | failure | no (the budget is spent) | yes (it answered) |
/// | ✦ `hyper_util` client error that is a connect error (with `hyper`) | failure | yes | no |
/// | ✦ [`http::reqwest::FailedAfterSending`](crate::http::reqwest::FailedAfterSending) (with `reqwest`: failed after the request's body began to be sent, a redirect's next hop, say) | as the reqwest error under it | as the reqwest error under it | yes |
/// | ✦ `reqwest::Error` that is a connect error (with `reqwest`) | failure | yes | no |
/// | ✦ `reqwest::Error` building the request (with `reqwest`: the caller's malformed request) | ignored | no | no |
/// | ✦ `io::Error` refused / address unavailable / address in use (connect) | failure | yes | no |
/// | any other `io::Error` (reset, aborted, broken pipe, not connected, unexpected EOF, timed out: the request may have been sent) | failure | yes | yes |
/// | `tonic::Status` (with `grpc`) | by its code and its `grpc-retry-pushback-ms`, as [`GrpcClassifier`](super::GrpcClassifier) | | |
/// | anything else | failure | yes | yes |
///
/// The first match on the way down the chain decides, except for a `tonic::Status`:
/// under it (its source, so made in this process: a source does not travel over the
/// wire), only our own errors and a connection never made (the rows marked ✦: the
/// breaker's, the bulkhead's, the upload's, the timeouts' (tonic's `TimeoutExpired`
/// too), a request hyper dropped before dispatching it, and connect errors) decide
/// instead of its code, so a status wrapping a connect error is a call that never
/// left, and one wrapping our own rejection is not the dependency's failure. So does a
/// transport error (an `io::Error`, a `hyper::Error`) under an `UNKNOWN`: tonic's
/// stand-in for a transport failure it has no code for, a connection reset mid-call, is
/// that transport error (a retryable failure), not a server's `UNKNOWN` (not retried).
/// Any other error under a status leaves the decision to its code.
///
/// Retrying a call that may have taken effect is still subject to the retry layer's
/// idempotency rules.
pub fn classify_error(err: &(dyn Error + 'static)) -> Classification {
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    // The class of the first `tonic::Status` on the way down.
    #[cfg(feature = "grpc")]
    let mut status: Option<Classification> = None;
    // Whether that status is an `UNKNOWN` made here: what tonic makes of a transport
    // failure it has no code for (a connection reset mid-call).
    #[cfg(feature = "grpc")]
    let mut unknown = false;
    while let Some(e) = cur {
        if let Some(c) = decisive(e) {
            return c;
        }
        #[cfg(feature = "grpc")]
        if (status.is_none() || unknown)
            && let Some(io) = as_type::<io::Error>(e)
        {
            return classify_io(io.kind());
        }
        #[cfg(feature = "grpc")]
        if status.is_none() {
            if let Some(s) = as_type::<tonic::Status>(e) {
                // With the server's pushback (`grpc-retry-pushback-ms`): when to retry,
                // or (negative) not to.
                let code = super::grpc::GrpcCode::from_i32(s.code() as i32);
                status =
                    Some(super::GrpcClassifier::new().classify_code(code, s.metadata().as_ref()));
                unknown = code == super::grpc::GrpcCode::Unknown;
            }
        } else if unknown && as_type::<hyper::Error>(e).is_some() {
            return Classification::failure();
        }
        #[cfg(not(feature = "grpc"))]
        if let Some(io) = as_type::<io::Error>(e) {
            return classify_io(io.kind());
        }
        cur = e.source();
    }
    #[cfg(feature = "grpc")]
    if let Some(status) = status {
        return status;
    }
    Classification::failure()
}

/// The class of the first error in `err`'s chain that decides even under a
/// `tonic::Status` (see [`classify_error`]), if any.
#[cfg(feature = "grpc")]
pub(crate) fn decisive_in_chain(err: &(dyn Error + 'static)) -> Option<Classification> {
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(c) = decisive(e) {
            return Some(c);
        }
        cur = e.source();
    }
    None
}

/// Whether a transport error (an `io::Error`, a `hyper::Error`) is under `status`: an
/// `UNKNOWN` over one is tonic's stand-in for a transport failure it has no code for.
#[cfg(feature = "grpc")]
pub(crate) fn transport_error_under(status: &tonic::Status) -> bool {
    let mut cur = status.source();
    while let Some(e) = cur {
        if as_type::<io::Error>(e).is_some() || as_type::<hyper::Error>(e).is_some() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// The source `to_status` gives the `UNAVAILABLE` it makes of a request hyper dropped
/// before dispatching it (hyper's error cannot be cloned): read as that error is.
#[cfg(any(feature = "grpc", feature = "hyper", feature = "reqwest"))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct NotDispatched;

#[cfg(any(feature = "grpc", feature = "hyper", feature = "reqwest"))]
impl std::fmt::Display for NotDispatched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request was dropped before it was dispatched (its connection closed)")
    }
}

#[cfg(any(feature = "grpc", feature = "hyper", feature = "reqwest"))]
impl Error for NotDispatched {}

/// The rows of [`classify_error`] that decide wherever they are in the chain: our own
/// errors, and a connection never made.
#[inline]
fn decisive(e: &(dyn Error + 'static)) -> Option<Classification> {
    if let Some(open) = as_type::<crate::circuit_breaker::error::Open>(e) {
        // A breaker forced open has no end to wait for: not retried.
        return Some(
            Classification::ignored()
                .with_retryable(!open.is_forced())
                .with_retry_after((!open.is_forced()).then(|| open.retry_after()))
                .as_own_rejection(),
        );
    }
    if as_type::<crate::bulkhead::error::Full>(e).is_some() {
        return Some(
            Classification::ignored()
                .with_retryable(true)
                .as_own_rejection(),
        );
    }
    // The caller's upload broke: not the dependency's failure, and a body that failed
    // cannot be sent again. (The server may have seen part of it.)
    #[cfg(feature = "http")]
    if as_type::<crate::http::body::RequestBodyFailed>(e).is_some() {
        return Some(Classification::ignored().with_effect(true));
    }
    if as_type::<crate::timeout::error::Elapsed>(e).is_some() {
        return Some(Classification::failure());
    }
    // tonic's own timeout (a `Channel` enforces the `grpc-timeout` it sends, from
    // `Endpoint::timeout`, `Request::set_timeout` or a layer outside): an attempt
    // timeout like `Elapsed`, though tonic reports it as `CANCELLED`.
    #[cfg(feature = "grpc")]
    if as_type::<tonic::TimeoutExpired>(e).is_some() {
        return Some(Classification::failure());
    }
    if let Some(d) = as_type::<crate::timeout::error::DeadlineExceeded>(e) {
        // Expired before the attempt was made (a wait for readiness, a bulkhead's
        // queue, outlasted the call's deadline): nothing was sent, so it says nothing
        // of the dependency's health, and a half-open breaker must not reopen on it.
        if d.expired_before_call() {
            return Some(Classification::ignored());
        }
        return Some(Classification::failure().with_retryable(false));
    }
    if as_type::<crate::timeout::error::BodyDeadlineExceeded>(e).is_some() {
        return Some(
            Classification::failure()
                .with_retryable(false)
                .with_effect(true),
        );
    }
    // hyper: a request dropped before it was dispatched to its connection (the
    // connection closed first, "connection closed" / "connection was not ready"),
    // which tonic turns into a `CANCELLED` status: a success by that code. (Or its
    // stand-in under the `UNAVAILABLE` that `to_status` makes of it.)
    #[cfg(any(feature = "grpc", feature = "hyper", feature = "reqwest"))]
    if as_type::<hyper::Error>(e).is_some_and(hyper::Error::is_canceled)
        || as_type::<NotDispatched>(e).is_some()
    {
        return Some(Classification::failure().with_effect(false));
    }
    // hyper-util's client: a failure to connect (refused, DNS, a connect timeout, a TLS
    // handshake, a scheme its connector refuses) never sent the request.
    #[cfg(feature = "hyper")]
    if as_type::<hyper_util::client::legacy::Error>(e).is_some_and(|h| h.is_connect()) {
        return Some(Classification::failure().with_effect(false));
    }
    // tonic's channel wraps every failure to connect (refused, DNS, a connect timeout,
    // a TLS handshake) in a `ConnectError`, whatever `io::Error` it holds: the request
    // was never sent.
    #[cfg(feature = "grpc")]
    if as_type::<tonic::ConnectError>(e).is_some() {
        return Some(Classification::failure().with_effect(false));
    }
    // A request whose body began to be sent reached a server, whatever failed after:
    // the error under it decides the rest (a caller's broken upload is still the
    // caller's), only not that the request was never sent.
    #[cfg(feature = "reqwest")]
    if let Some(f) = as_type::<crate::http::reqwest::FailedAfterSending>(e) {
        return Some(classify_error(f.get_ref()).with_effect(true));
    }
    #[cfg(feature = "reqwest")]
    if let Some(r) = as_type::<reqwest::Error>(e) {
        if r.is_connect() {
            return Some(Classification::failure().with_effect(false));
        }
        if r.is_builder() {
            // The caller's own malformed request (a bad URL or scheme): never sent, and
            // no sign of the dependency's health, so no breaker counts it.
            return Some(Classification::ignored());
        }
    }
    if let Some(io) = as_type::<io::Error>(e)
        && is_connect(io.kind())
    {
        return Some(classify_io(io.kind()));
    }
    None
}

/// `e` as a `T`, if it is one. The size comes from the vtable with a plain load, so a
/// type of another size is ruled out without the virtual `type_id` call that
/// `downcast_ref` makes — the chain walk above checks up to seven types per link, and
/// for a foreign error most of them differ in size.
#[inline(always)]
fn as_type<'e, T: Error + 'static>(e: &'e (dyn Error + 'static)) -> Option<&'e T> {
    if std::mem::size_of_val(e) != std::mem::size_of::<T>() {
        return None;
    }
    e.downcast_ref::<T>()
}

/// Only the errors of a connection that was never made are "no effect". `NotConnected`
/// (`ENOTCONN`) is not one of them: it also comes from a socket that was connected and
/// has since been shut down, after the request may have reached the server, and a
/// non-idempotent request retried on it could take effect twice.
fn classify_io(kind: io::ErrorKind) -> Classification {
    if is_connect(kind) {
        Classification::failure().with_effect(false)
    } else {
        Classification::failure()
    }
}

/// An I/O error of a connection that was never made.
fn is_connect(kind: io::ErrorKind) -> bool {
    use io::ErrorKind::*;
    matches!(kind, ConnectionRefused | AddrNotAvailable | AddrInUse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Class;

    /// tonic makes a transport failure it has no code for (a connection reset mid-call)
    /// an `UNKNOWN` with the error as its source: read as that transport error, a
    /// retryable failure, not as a server's `UNKNOWN`, which is not retried (it was, and
    /// an idempotent call cut by a restarted server was not retried). An `UNKNOWN`
    /// over another error, or from the server, keeps its code.
    #[cfg(feature = "grpc")]
    #[test]
    fn an_unknown_status_over_a_transport_error_is_that_error() {
        let reset =
            tonic::Status::from_error(Box::new(io::Error::from(io::ErrorKind::ConnectionReset)));
        assert_eq!(reset.code(), tonic::Code::Unknown);
        let c = classify_error(&reset);
        assert!(c.is_failure() && c.is_retryable(), "{c:?}");
        assert!(c.may_have_taken_effect(), "{c:?}");
        #[derive(Debug)]
        struct Other;
        impl std::fmt::Display for Other {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("other")
            }
        }
        impl Error for Other {}
        for status in [
            tonic::Status::from_error(Box::new(Other)),
            tonic::Status::unknown("the server's"),
        ] {
            assert_eq!(status.code(), tonic::Code::Unknown);
            let c = classify_error(&status);
            assert!(c.is_failure() && !c.is_retryable(), "{c:?}");
        }
        // Another code over a reset keeps its code (the server's, or tonic's own).
        let mut internal = tonic::Status::internal("h2");
        internal.set_source(std::sync::Arc::new(io::Error::from(
            io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(
            classify_error(&internal),
            crate::classify::GrpcClassifier::new().classify_code(
                crate::classify::grpc::GrpcCode::Internal,
                &http::HeaderMap::new()
            )
        );
    }

    /// A tonic channel's connect timeout or DNS failure (a `ConnectError` around an
    /// `io::Error` of no connect kind) never sent the request: retried whatever the
    /// method. It was a failure that may have taken effect, so a gRPC call (a `POST`)
    /// was not retried.
    #[cfg(feature = "grpc")]
    #[test]
    fn a_tonic_connect_error_never_took_effect() {
        for io in [
            io::Error::new(io::ErrorKind::TimedOut, "connect timeout"),
            io::Error::other("dns error"),
        ] {
            let err: crate::BoxError = Box::new(tonic::ConnectError(Box::new(io)));
            let c = classify_error(&*err);
            assert!(c.is_failure() && c.is_retryable(), "{c:?}");
            assert!(!c.may_have_taken_effect(), "{c:?}");
        }
    }

    #[test]
    fn connect_refused_is_retryable_failure_without_effect() {
        let e: BoxError = io::Error::from(io::ErrorKind::ConnectionRefused).into();
        let c = classify_error(&*e);
        assert_eq!(c.class(), Class::Failure);
        assert!(c.is_retryable());
        assert!(!c.may_have_taken_effect());
    }

    #[test]
    fn not_connected_may_have_taken_effect() {
        let e: BoxError = io::Error::from(io::ErrorKind::NotConnected).into();
        let c = classify_error(&*e);
        assert!(c.is_failure());
        assert!(c.may_have_taken_effect());
    }

    #[test]
    fn reset_after_send_may_have_taken_effect() {
        let e: BoxError = io::Error::from(io::ErrorKind::ConnectionReset).into();
        let c = classify_error(&*e);
        assert_eq!(c.class(), Class::Failure);
        assert!(c.may_have_taken_effect());
    }

    #[test]
    fn io_error_found_deep_in_the_source_chain() {
        #[derive(Debug)]
        struct Wrapper(io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl Error for Wrapper {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }
        let e: BoxError = Box::new(Wrapper(io::ErrorKind::ConnectionRefused.into()));
        assert!(!classify_error(&*e).may_have_taken_effect());
    }

    #[test]
    fn own_rejections_are_ignored() {
        let full: BoxError = crate::bulkhead::error::Full::new(1, 0).into();
        assert!(classify_error(&*full).is_ignored());
        let open: BoxError =
            crate::circuit_breaker::error::Open::new(std::time::Duration::from_secs(3)).into();
        let c = classify_error(&*open);
        assert!(c.is_ignored());
        assert_eq!(c.retry_after(), Some(std::time::Duration::from_secs(3)));
        assert!(c.is_own_rejection());
        assert!(classify_error(&*full).is_own_rejection());
        // A classifier's own `Ignored` outcome is not our rejection.
        assert!(!Classification::ignored().is_own_rejection());
    }

    #[test]
    fn own_attempt_timeout_is_retryable_failure() {
        let e: BoxError =
            crate::timeout::error::Elapsed::new(std::time::Duration::from_secs(1)).into();
        let c = classify_error(&*e);
        assert_eq!(c.class(), Class::Failure);
        assert!(c.is_retryable());
    }

    #[test]
    fn a_deadline_that_passed_before_the_call_is_ignored_and_one_during_it_a_failure() {
        let before: BoxError =
            crate::timeout::error::DeadlineExceeded::new(std::time::Duration::ZERO, true).into();
        let c = classify_error(&*before);
        assert!(c.is_ignored());
        assert!(!c.is_retryable());
        assert!(!c.may_have_taken_effect());
        let during: BoxError =
            crate::timeout::error::DeadlineExceeded::new(std::time::Duration::from_secs(1), false)
                .into();
        let c = classify_error(&*during);
        assert_eq!(c.class(), Class::Failure);
        assert!(!c.is_retryable());
        assert!(c.may_have_taken_effect());
    }

    #[test]
    fn a_body_past_the_deadline_is_a_failure_not_retried_that_took_effect() {
        let e: BoxError = crate::timeout::error::BodyDeadlineExceeded::new().into();
        let c = classify_error(&*e);
        assert_eq!(c.class(), Class::Failure);
        assert!(!c.is_retryable());
        assert!(c.may_have_taken_effect());
    }

    #[test]
    fn unknown_errors_are_retryable_failures() {
        let e: BoxError = "boom".into();
        assert_eq!(classify_error(&*e), Classification::failure());
    }
}
