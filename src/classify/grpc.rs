//! gRPC classification: `grpc-status` from headers or trailers, `grpc-retry-pushback-ms`.
//!
//! A gRPC response carries its status in the trailers, except for "trailers-only"
//! responses (most errors), which carry it in the headers. A tower layer sees the
//! response when the headers arrive, so [`GrpcClassifier`] classifies from the headers
//! when the status is there, maps a non-200 HTTP status as the gRPC spec says, and
//! otherwise treats the response as a provisional success; the final answer comes from
//! [`GrpcClassifier::classify_trailers`] when the body ends. A stream that ends without
//! any `grpc-status` is an `UNKNOWN` failure, as the gRPC spec requires a status
//! (grpc-go reports `INTERNAL`; tonic 0.14 alone reads a `200` without one as a
//! stream that ended well, and `GrpcStatusLayer` so changes what its caller sees).

use super::{AsError, Classification, Classify, classify_error};
use http::{HeaderMap, Response};
use std::time::Duration;

/// The metadata the [idempotency layer](crate::idempotency) adds to its `UNAVAILABLE`
/// answer to a key whose first request is still running (HTTP's `409` with
/// `Retry-After`). [`GrpcClassifier`] reads such an answer as ignored (no failure of the
/// server: this copy was refused) and retryable after its `grpc-retry-pushback-ms`,
/// unless `UNAVAILABLE` is overridden. A client that does not know it sees a plain
/// `UNAVAILABLE` to retry.
pub const IN_PROGRESS_HEADER: &str = "postbox-in-progress";

/// The canonical gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[allow(
    missing_docs,
    reason = "the canonical gRPC code names document themselves"
)]
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl GrpcCode {
    /// The code for a numeric value; out-of-range values are `Unknown`, as the spec says.
    pub fn from_i32(v: i32) -> Self {
        use GrpcCode::*;
        match v {
            0 => Ok,
            1 => Cancelled,
            3 => InvalidArgument,
            4 => DeadlineExceeded,
            5 => NotFound,
            6 => AlreadyExists,
            7 => PermissionDenied,
            8 => ResourceExhausted,
            9 => FailedPrecondition,
            10 => Aborted,
            11 => OutOfRange,
            12 => Unimplemented,
            13 => Internal,
            14 => Unavailable,
            15 => DataLoss,
            16 => Unauthenticated,
            _ => Unknown,
        }
    }

    /// Reads `grpc-status` from a header map (headers or trailers), as tonic reads it:
    /// a code written canonically (`0` to `16`: no sign, space or leading zero), any
    /// other value present is `UNKNOWN`.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let code = match *headers.get("grpc-status")?.as_bytes() {
            [d @ b'0'..=b'9'] => i32::from(d - b'0'),
            [b'1', d @ b'0'..=b'6'] => 10 + i32::from(d - b'0'),
            _ => return Some(GrpcCode::Unknown),
        };
        Some(Self::from_i32(code))
    }

    /// The code the gRPC spec assigns to a non-200 HTTP status from a proxy.
    pub fn from_http_status(status: http::StatusCode) -> Self {
        match status.as_u16() {
            400 => GrpcCode::Internal,
            401 => GrpcCode::Unauthenticated,
            403 => GrpcCode::PermissionDenied,
            404 => GrpcCode::Unimplemented,
            429 | 502 | 503 | 504 => GrpcCode::Unavailable,
            _ => GrpcCode::Unknown,
        }
    }
}

/// The default class of a gRPC code (see the [module docs](super)).
pub(crate) fn default_class(code: GrpcCode) -> Classification {
    use GrpcCode::*;
    match code {
        Unavailable | DeadlineExceeded => Classification::failure(),
        ResourceExhausted => Classification::overload(None),
        Internal | Unknown | DataLoss => Classification::failure().with_retryable(false),
        _ => Classification::success(),
    }
}

/// The trailers of a binary gRPC-Web answer (`application/grpc-web`,
/// `application/grpc-web+proto`, …), which carries them in its body: the
/// length-prefixed frame flagged `0x80`, holding `name: value` lines. Returns the body's
/// length before that frame, and the trailers. `None` for any other answer, a body
/// without that frame, and the base64 `application/grpc-web-text` (not decoded).
pub(crate) fn web_trailers(headers: &HeaderMap, body: &[u8]) -> Option<(usize, HeaderMap)> {
    if !is_binary_web(headers) {
        return None;
    }
    frames_trailers(body)
}

/// `true` for a binary gRPC-Web answer: `application/grpc-web`, `+proto`, `;…`; not
/// `-text` (base64), nor another type.
pub(crate) fn is_binary_web(headers: &HeaderMap) -> bool {
    const WEB: &[u8] = b"application/grpc-web";
    let Some(content_type) = headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    content_type
        .as_bytes()
        .split_at_checked(WEB.len())
        .is_some_and(|(media, rest)| {
            media.eq_ignore_ascii_case(WEB) && matches!(rest.first(), None | Some(b'+' | b';'))
        })
}

/// A gRPC-Web-text (base64) body decoded into its gRPC-Web frames, or `None` if it is
/// not base64. A server may send the body as several base64 chunks, each padded: each
/// is decoded on its own.
#[cfg(feature = "grpc")]
pub(crate) fn web_text_decode(body: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let engine = &base64::engine::general_purpose::STANDARD;
    let mut decoded = Vec::with_capacity(body.len() / 4 * 3);
    let mut rest = body;
    while !rest.is_empty() {
        // A chunk ends after its padding (or with the body).
        let end = match rest.iter().position(|&b| b == b'=') {
            Some(i) => i + rest[i..].iter().take_while(|&&b| b == b'=').count(),
            None => rest.len(),
        };
        let chunk: Vec<u8> = rest[..end]
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        engine.decode_vec(&chunk, &mut decoded).ok()?;
        rest = &rest[end..];
    }
    Some(decoded)
}

/// The trailers frame of a body of gRPC-Web frames: where it starts, and its headers.
pub(crate) fn frames_trailers(body: &[u8]) -> Option<(usize, HeaderMap)> {
    let mut rest = body;
    while let [flags, a, b, c, d, after @ ..] = rest {
        let len = usize::try_from(u32::from_be_bytes([*a, *b, *c, *d])).ok()?;
        let payload = after.get(..len)?;
        if flags & 0x80 != 0 {
            return Some((body.len() - rest.len(), web_trailer_lines(payload)));
        }
        rest = &after[len..];
    }
    None
}

/// The most fields read from a gRPC-Web trailers frame; the lines after are ignored.
/// (A `HeaderMap` panics past 24 576 distinct names, and an answer of that many is
/// no answer from a gRPC server.)
pub(crate) const MAX_WEB_TRAILER_FIELDS: usize = 1024;

/// The trailers in the payload of a gRPC-Web trailers frame: `name: value` lines, at
/// most [`MAX_WEB_TRAILER_FIELDS`] of them.
pub(crate) fn web_trailer_lines(payload: &[u8]) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    let mut fields = 0;
    for line in payload.split(|&byte| byte == b'\n') {
        if fields == MAX_WEB_TRAILER_FIELDS {
            break;
        }
        let Some(colon) = line.iter().position(|&byte| byte == b':') else {
            continue;
        };
        let (name, value) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            if trailers.try_append(name, value).is_err() {
                break;
            }
            fields += 1;
        }
    }
    trailers
}

/// Reads `grpc-retry-pushback-ms`.
///
/// `Some(Ok(d))` is a hint; `Some(Err(()))` is a pushback that is negative or not a
/// number, which the gRPC retry design (A6) defines as "do not retry". A number too
/// large for a `u64` is the longest hint, `Duration::MAX`, as an HTTP `Retry-After`
/// too large is.
pub fn retry_pushback(headers: &HeaderMap) -> Option<Result<Duration, ()>> {
    let v = headers.get("grpc-retry-pushback-ms")?;
    let s = v.to_str().map_err(|_| ()).map(str::trim);
    Some(s.and_then(|s| match s.parse::<u64>() {
        Ok(ms) => Ok(Duration::from_millis(ms)),
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => Ok(Duration::MAX),
        Err(_) => Err(()),
    }))
}

/// Classifies gRPC responses by status code, with user overrides.
///
/// Defaults: `UNAVAILABLE` and `DEADLINE_EXCEEDED` are retryable failures;
/// `RESOURCE_EXHAUSTED` is a retryable overload; `INTERNAL`, `UNKNOWN` (and a missing
/// status) and `DATA_LOSS` are failures that are not retried; every other code is a
/// success for the breaker and not retryable. `grpc-retry-pushback-ms` becomes the
/// retry hint, or forbids a retry when negative. An `UNAVAILABLE` with
/// [`postbox-in-progress`](IN_PROGRESS_HEADER) metadata (the idempotency layer's answer
/// to a duplicate of a call still running) is ignored by the breaker and retryable
/// after its hint, unless `UNAVAILABLE` is overridden.
///
/// # Example
/// ```
/// use http::HeaderMap;
/// use postbox::classify::{Class, GrpcClassifier};
///
/// let mut trailers = HeaderMap::new();
/// trailers.insert("grpc-status", "14".parse().unwrap()); // UNAVAILABLE
/// let c = GrpcClassifier::new().classify_trailers(Some(&trailers));
/// assert_eq!(c.class(), Class::Failure);
/// assert!(c.is_retryable());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcClassifier {
    // bit i set: code i overridden; value bit in `failure` / `retryable`.
    overridden: u32,
    failure: u32,
    retryable: u32,
}

// === impl GrpcClassifier ===

impl GrpcClassifier {
    /// The default gRPC classifier.
    pub const fn new() -> Self {
        Self {
            overridden: 0,
            failure: 0,
            retryable: 0,
        }
    }

    /// Counts `code` as a failure, retryable or not.
    pub const fn with_failure(mut self, code: GrpcCode, retryable: bool) -> Self {
        let bit = 1 << code as u32;
        self.overridden |= bit;
        self.failure |= bit;
        if retryable {
            self.retryable |= bit;
        } else {
            self.retryable &= !bit;
        }
        self
    }

    /// Counts `code` as a success (never retried).
    pub const fn with_success(mut self, code: GrpcCode) -> Self {
        let bit = 1 << code as u32;
        self.overridden |= bit;
        self.failure &= !bit;
        self.retryable &= !bit;
        self
    }

    /// Classifies a code and the header map it came in (for the pushback hint).
    pub fn classify_code(&self, code: GrpcCode, headers: &HeaderMap) -> Classification {
        let bit = 1 << code as u32;
        let mut c = if self.overridden & bit != 0 {
            if self.failure & bit != 0 {
                Classification::failure().with_retryable(self.retryable & bit != 0)
            } else {
                Classification::success()
            }
        } else if code == GrpcCode::Unavailable && headers.contains_key(IN_PROGRESS_HEADER) {
            // Our idempotency layer's answer to a key whose first request still runs
            // (HTTP's `409`): this copy was refused, which says nothing of the
            // server's health.
            Classification::ignored().with_retryable(true)
        } else {
            default_class(code)
        };
        if !c.is_success() {
            match retry_pushback(headers) {
                Some(Ok(d)) => c = c.with_retry_after(Some(d)),
                Some(Err(())) => c = c.with_retryable(false),
                None => {}
            }
        }
        c
    }

    /// Classifies the end of a stream from its trailers; no trailers, or trailers
    /// without `grpc-status`, are an `UNKNOWN` failure.
    pub fn classify_trailers(&self, trailers: Option<&HeaderMap>) -> Classification {
        match trailers.and_then(|t| GrpcCode::from_headers(t).map(|c| (c, t))) {
            Some((code, t)) => self.classify_code(code, t),
            None => self.classify_code(GrpcCode::Unknown, &HeaderMap::new()),
        }
    }

    /// Classifies response headers: the status when present (trailers-only response),
    /// the spec's mapping for a non-200 HTTP status, or `None` when the status will
    /// arrive in the trailers.
    pub fn classify_headers(
        &self,
        status: http::StatusCode,
        headers: &HeaderMap,
    ) -> Option<Classification> {
        if let Some(code) = GrpcCode::from_headers(headers) {
            return Some(self.classify_code(code, headers));
        }
        if status != http::StatusCode::OK {
            let code = GrpcCode::from_http_status(status);
            let hint = || super::http::retry_after(headers, std::time::SystemTime::now());
            if self.overridden & (1 << code as u32) != 0 {
                // The caller's class for the code the spec maps this status to wins;
                // a proxy's `Retry-After` still holds for a class that waits (an
                // overload; a retryable failure of a `429` or `503`, not of a `502`
                // whose hint may be an hour), as in `HttpClassifier`: a server's hint
                // is never retried early.
                let c = self.classify_code(code, headers);
                if c.retry_after().is_none()
                    && (c.class() == super::Class::Overload
                        || (c.is_retryable() && matches!(status.as_u16(), 429 | 503)))
                {
                    return Some(c.with_retry_after(hint()));
                }
                return Some(c);
            }
            // A proxy's (or load balancer's) own answer, before any gRPC server: a 429,
            // or a 503 with `Retry-After`, asks us to slow down, as in HTTP.
            if status == http::StatusCode::TOO_MANY_REQUESTS {
                return Some(Classification::overload(hint()));
            }
            if status == http::StatusCode::SERVICE_UNAVAILABLE
                && let Some(after) = hint()
            {
                return Some(Classification::overload(Some(after)));
            }
            return Some(self.classify_code(code, headers));
        }
        None
    }
}

impl<B, E: AsError> Classify<Response<B>, E> for GrpcClassifier {
    /// Classifies from the headers; a response whose status is still to come in the
    /// trailers is a provisional success (see the [module docs](self)).
    fn classify(&self, outcome: Result<&Response<B>, &E>) -> Classification {
        match outcome {
            Ok(res) => self
                .classify_headers(res.status(), res.headers())
                .unwrap_or_else(Classification::success),
            Err(e) => e.as_error().map_or_else(Classification::failure, |e| {
                // A `tonic::Status` error (a generated client's) is classified like the
                // status of a response: this classifier's overrides, and the server's
                // pushback, apply.
                // (Otherwise the chain walk decides: it also sees a connect error under
                // the status, a call that never left.)
                #[cfg(feature = "grpc")]
                if let Some(status) = crate::error::find_cause::<tonic::Status>(e) {
                    let code = GrpcCode::from_i32(status.code() as i32);
                    let headers = status.metadata().as_ref();
                    // An `UNKNOWN` over a transport error is that error (a connection
                    // reset mid-call): not the server's answer an override is about.
                    if code == GrpcCode::Unknown && super::error::transport_error_under(status) {
                        return classify_error(e);
                    }
                    if self.overridden & (1 << code as u32) != 0
                        || retry_pushback(headers).is_some()
                    {
                        // Our own rejection or a connection never made, wrapped in the
                        // status, still decides: an override of the code is about
                        // the server's answers.
                        return super::error::decisive_in_chain(e)
                            .unwrap_or_else(|| self.classify_code(code, headers));
                    }
                }
                classify_error(e)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Class;

    /// An `UNKNOWN` over a transport error (tonic's stand-in for a connection reset
    /// mid-call) is that error, a retryable failure, whatever the overrides of
    /// `UNKNOWN` say: they are about the server's answers. (With `UNKNOWN` overridden
    /// as a success, a reset was a success, and the breaker never saw the outage.)
    #[cfg(feature = "grpc")]
    #[test]
    fn an_override_of_unknown_leaves_a_transport_error_under_it_alone() {
        use crate::BoxError;
        let reset = || -> BoxError {
            tonic::Status::from_error(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            )))
            .into()
        };
        for classifier in [
            GrpcClassifier::new().with_success(GrpcCode::Unknown),
            GrpcClassifier::new().with_failure(GrpcCode::Unknown, false),
        ] {
            let err = reset();
            let c = <GrpcClassifier as Classify<Response<()>, BoxError>>::classify(
                &classifier,
                Err(&err),
            );
            assert_eq!(c.class(), Class::Failure);
            assert!(c.is_retryable());
        }
        // A server's `UNKNOWN` (no source) still follows the override.
        let server: BoxError = tonic::Status::unknown("boom").into();
        let c = <GrpcClassifier as Classify<Response<()>, BoxError>>::classify(
            &GrpcClassifier::new().with_success(GrpcCode::Unknown),
            Err(&server),
        );
        assert_eq!(c.class(), Class::Success);
    }

    /// A `tonic::Status` error (a generated client's) is classified by this
    /// classifier's overrides and with the server's pushback, as the same status in a
    /// response is. (Before, the defaults applied and the pushback was ignored, so a
    /// retry came before the server asked.)
    #[cfg(feature = "grpc")]
    #[test]
    fn a_status_error_gets_the_overrides_and_the_pushback() {
        use crate::BoxError;
        let mut status = tonic::Status::unavailable("busy");
        status
            .metadata_mut()
            .insert("grpc-retry-pushback-ms", "5000".parse().unwrap());
        let err: BoxError = status.into();
        let c = <GrpcClassifier as Classify<Response<()>, BoxError>>::classify(
            &GrpcClassifier::new(),
            Err(&err),
        );
        assert_eq!(c.class(), Class::Failure);
        assert_eq!(c.retry_after(), Some(Duration::from_secs(5)));
        let err: BoxError = tonic::Status::unavailable("fine").into();
        let c = <GrpcClassifier as Classify<Response<()>, BoxError>>::classify(
            &GrpcClassifier::new().with_success(GrpcCode::Unavailable),
            Err(&err),
        );
        assert_eq!(c.class(), Class::Success);
    }

    /// A proxy's `429`, or `503` with `Retry-After`, in front of a gRPC server (no
    /// `grpc-status`) is overload with the hint, as in HTTP (it was a plain
    /// `UNAVAILABLE` failure, and the hint was lost).
    #[test]
    fn a_proxys_429_or_503_with_retry_after_is_overload() {
        let c = GrpcClassifier::new();
        let mut h = HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        for status in [429, 503] {
            let status = http::StatusCode::from_u16(status).unwrap();
            let got = c.classify_headers(status, &h).unwrap();
            assert_eq!(got.class(), Class::Overload, "{status}");
            assert_eq!(got.retry_after(), Some(Duration::from_secs(7)), "{status}");
        }
        let plain = c
            .classify_headers(http::StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new())
            .unwrap();
        assert_eq!(plain.class(), Class::Failure);
    }

    /// A status made in this process wrapping a connect error or one of our own
    /// rejections is classified by what it wraps: a call that never left can be
    /// retried whatever its method, and our own breaker's rejection is never counted
    /// against the dependency. A status without a source keeps its code's class.
    #[cfg(feature = "grpc")]
    #[test]
    fn a_status_is_classified_by_the_error_it_wraps() {
        use crate::BoxError;
        use std::sync::Arc;
        let classify = |status: tonic::Status| {
            let err: BoxError = status.into();
            <GrpcClassifier as Classify<Response<()>, BoxError>>::classify(
                &GrpcClassifier::new(),
                Err(&err),
            )
        };
        let mut refused = tonic::Status::unavailable("connect");
        refused.set_source(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        let c = classify(refused);
        assert_eq!(c.class(), Class::Failure);
        assert!(c.is_retryable());
        assert!(!c.may_have_taken_effect());

        let mut rejected = tonic::Status::unknown("breaker");
        rejected.set_source(Arc::new(crate::circuit_breaker::error::Open::new(
            Duration::from_secs(3),
        )));
        let c = classify(rejected);
        assert_eq!(c.class(), Class::Ignored);
        assert_eq!(c.retry_after(), Some(Duration::from_secs(3)));

        let c = classify(tonic::Status::unknown("from the server"));
        assert_eq!(c.class(), Class::Failure);
        assert!(!c.is_retryable());

        // Any other error under a status leaves the decision to its code: a cancelled
        // call whose transport reported a reset is still a cancelled call.
        let mut cancelled = tonic::Status::cancelled("gone");
        cancelled.set_source(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(classify(cancelled).class(), Class::Success);

        // An override of the code does not make our own rejection under it a failure.
        let mut rejected = tonic::Status::unknown("breaker");
        rejected.set_source(Arc::new(crate::circuit_breaker::error::Open::new(
            Duration::from_secs(3),
        )));
        let err: BoxError = rejected.into();
        let c = <GrpcClassifier as Classify<Response<()>, BoxError>>::classify(
            &GrpcClassifier::new().with_failure(GrpcCode::Unknown, true),
            Err(&err),
        );
        assert_eq!(c.class(), Class::Ignored);
    }

    /// tonic's own timeout (a `Channel` enforcing the `grpc-timeout` it sent) is an
    /// attempt timeout, retryable, bare or under the `CANCELLED` status tonic makes of
    /// it: it was a success (the class of `CANCELLED`), so no breaker counted it and no
    /// retry was made.
    #[cfg(feature = "grpc")]
    #[test]
    fn a_channels_own_timeout_is_a_retryable_failure() {
        use crate::BoxError;
        let classify = |err: BoxError| {
            <GrpcClassifier as Classify<Response<()>, BoxError>>::classify(
                &GrpcClassifier::new(),
                Err(&err),
            )
        };
        let status = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(status.code(), tonic::Code::Cancelled);
        for err in [BoxError::from(status), Box::new(tonic::TimeoutExpired(()))] {
            let c = classify(err);
            assert_eq!(c.class(), Class::Failure);
            assert!(c.is_retryable());
        }
    }

    /// A call whose connection closed before it was dispatched: hyper calls it
    /// canceled and tonic makes it `CANCELLED` (with hyper's error as its source), a
    /// success by its code, so no breaker counted the outage and no fallback deferred
    /// the call. It is a failure that took no effect, answered `UNAVAILABLE`; a
    /// `CANCELLED` the server sent stays a success.
    #[cfg(feature = "grpc")]
    #[tokio::test]
    async fn a_call_whose_connection_closed_under_it_is_a_failure() {
        use crate::BoxError;
        let (client_io, server_io) = tokio::io::duplex(64);
        let (mut send, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<bytes::Bytes>,
        >(hyper_util::rt::TokioIo::new(client_io))
        .await
        .unwrap();
        drop(conn);
        drop(server_io);
        let err = send
            .send_request(http::Request::new(http_body_util::Empty::new()))
            .await
            .unwrap_err();
        assert!(err.is_canceled(), "{err}");
        let status = tonic::Status::from_error(Box::new(err));
        assert_eq!(status.code(), tonic::Code::Cancelled);
        let mapped = crate::error::to_status(&status);
        assert_eq!(mapped.code(), tonic::Code::Unavailable);
        assert!(
            !classify_error(&mapped).may_have_taken_effect(),
            "a layer outside reads the mapped status as never sent"
        );
        let via_layer = crate::grpc::into_status(Box::new(status.clone()));
        assert_eq!(via_layer.code(), tonic::Code::Unavailable);
        let c = classify_error(&status);
        assert_eq!(c.class(), Class::Failure);
        assert!(c.is_retryable());
        assert!(!c.may_have_taken_effect(), "never dispatched");
        let wrapped: BoxError = Box::new(status);
        assert_eq!(classify_error(&*wrapped).class(), Class::Failure);

        let sent = tonic::Status::cancelled("the server gave up");
        assert_eq!(classify_error(&sent).class(), Class::Success);
        assert_eq!(
            crate::error::to_status(&sent).code(),
            tonic::Code::Cancelled
        );
    }

    /// A `tonic::Status` classified through the error chain (the typed enqueue
    /// flavour's and `ClassifierJudge`'s default, `ErrorClassifier`) keeps the server's
    /// pushback: when to retry, or (negative) not to. It was classified by its code
    /// alone, so a deferral was due at once and "do not retry" was replayed.
    #[cfg(feature = "grpc")]
    #[test]
    fn a_status_in_an_error_chain_keeps_its_pushback() {
        let with_pushback = |ms: &str| {
            let mut status = tonic::Status::unavailable("busy");
            status
                .metadata_mut()
                .insert("grpc-retry-pushback-ms", ms.parse().unwrap());
            crate::classify::classify_error(&status)
        };
        let c = with_pushback("30000");
        assert_eq!(c.class(), Class::Failure);
        assert_eq!(c.retry_after(), Some(Duration::from_secs(30)));
        assert!(!with_pushback("-1").is_retryable());
    }

    /// `grpc-status` is read as tonic reads it: `00` is no `OK` (tonic's client fails
    /// the call), nor `+14` or `014` an `UNAVAILABLE`; a value that is not text is
    /// present, `UNKNOWN`, not missing. (They were read as numbers, and a status that
    /// is not text as none.)
    #[test]
    fn grpc_status_is_read_as_tonic_reads_it() {
        let read = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", http::HeaderValue::from_bytes(v).unwrap());
            GrpcCode::from_headers(&h)
        };
        for (v, code) in [
            (&b"0"[..], GrpcCode::Ok),
            (b"9", GrpcCode::FailedPrecondition),
            (b"14", GrpcCode::Unavailable),
            (b"16", GrpcCode::Unauthenticated),
            (b"17", GrpcCode::Unknown),
            (b"00", GrpcCode::Unknown),
            (b"+14", GrpcCode::Unknown),
            (b"014", GrpcCode::Unknown),
            (b"-0", GrpcCode::Unknown),
            (b"\xff", GrpcCode::Unknown),
        ] {
            assert_eq!(read(v), Some(code), "{v:?}");
        }
        assert_eq!(GrpcCode::from_headers(&HeaderMap::new()), None);
    }

    /// The idempotency layer's `UNAVAILABLE` for a key in progress is ignored and
    /// retried after its pushback, in a response and in a `tonic::Status` error alike;
    /// an override of `UNAVAILABLE` still decides.
    #[test]
    fn an_answer_in_progress_is_ignored_and_retried_after_its_pushback() {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", "14".parse().unwrap());
        headers.insert("grpc-retry-pushback-ms", "1000".parse().unwrap());
        headers.insert(IN_PROGRESS_HEADER, "1".parse().unwrap());
        let c = GrpcClassifier::new().classify_trailers(Some(&headers));
        assert_eq!(c.class(), Class::Ignored);
        assert!(c.is_retryable());
        assert_eq!(c.retry_after(), Some(Duration::from_secs(1)));
        let overridden = GrpcClassifier::new()
            .with_failure(GrpcCode::Unavailable, true)
            .classify_trailers(Some(&headers));
        assert_eq!(overridden.class(), Class::Failure);
        #[cfg(feature = "grpc")]
        {
            let status = tonic::Status::from_header_map(&headers).unwrap();
            let c = crate::classify::classify_error(&status);
            assert_eq!(c.class(), Class::Ignored);
            assert_eq!(c.retry_after(), Some(Duration::from_secs(1)));
        }
    }

    /// An override applies to a proxy's answer too: it is classified as the code the
    /// spec maps its HTTP status to, and that code's override wins over the overload
    /// reading of a 429.
    #[test]
    fn an_override_applies_to_a_proxys_answer() {
        let c = GrpcClassifier::new().with_success(GrpcCode::Unavailable);
        let got = c
            .classify_headers(http::StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new())
            .unwrap();
        assert_eq!(got.class(), Class::Success);
    }

    /// Overriding the code a proxy's `429` or `503` maps to keeps the proxy's
    /// `Retry-After` for a class that waits, as `HttpClassifier` does; not for one that
    /// does not.
    #[test]
    fn an_override_of_a_proxys_answer_keeps_its_retry_after() {
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, "30".parse().unwrap());
        for status in [
            http::StatusCode::TOO_MANY_REQUESTS,
            http::StatusCode::SERVICE_UNAVAILABLE,
        ] {
            let c = GrpcClassifier::new().with_failure(GrpcCode::Unavailable, true);
            let got = c.classify_headers(status, &h).unwrap();
            assert_eq!(got.class(), Class::Failure, "{status}");
            assert_eq!(got.retry_after(), Some(Duration::from_secs(30)), "{status}");
            let c = GrpcClassifier::new().with_failure(GrpcCode::Unavailable, false);
            let got = c.classify_headers(status, &h).unwrap();
            assert!(!got.is_retryable(), "{status}");
            assert_eq!(got.retry_after(), None, "{status}");
        }
        // A `502` (also `UNAVAILABLE`) made a retryable failure does not take it, as in
        // `HttpClassifier`: a proxy's `502` with an hour's hint would end the retries.
        let bad_gateway = http::StatusCode::BAD_GATEWAY;
        let c = GrpcClassifier::new().with_failure(GrpcCode::Unavailable, true);
        let got = c.classify_headers(bad_gateway, &h).unwrap();
        assert_eq!(got.retry_after(), None);
    }

    /// A pushback too large for a `u64` is the longest hint (as an HTTP `Retry-After`
    /// is), not "do not retry"; a negative or non-numeric one is.
    #[test]
    fn a_pushback_too_large_is_the_longest_hint() {
        let mut h = HeaderMap::new();
        for (value, want) in [
            ("99999999999999999999999", Some(Ok(Duration::MAX))),
            ("250", Some(Ok(Duration::from_millis(250)))),
            ("-1", Some(Err(()))),
            ("soon", Some(Err(()))),
        ] {
            h.insert("grpc-retry-pushback-ms", value.parse().unwrap());
            assert_eq!(retry_pushback(&h), want, "{value}");
        }
    }

    fn trailers(status: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", status.parse().unwrap());
        h
    }

    #[test]
    fn grpc_status_read_from_trailers() {
        let c = GrpcClassifier::new();
        let unavailable = c.classify_trailers(Some(&trailers("14")));
        assert_eq!(unavailable.class(), Class::Failure);
        assert!(unavailable.is_retryable());
        let invalid = c.classify_trailers(Some(&trailers("3")));
        assert_eq!(invalid.class(), Class::Success);
        assert!(!invalid.is_retryable());
        assert!(c.classify_trailers(Some(&trailers("0"))).is_success());
    }

    #[test]
    fn missing_grpc_status_is_an_unknown_failure() {
        let c = GrpcClassifier::new();
        assert_eq!(c.classify_trailers(None).class(), Class::Failure);
        assert_eq!(
            c.classify_trailers(Some(&HeaderMap::new())).class(),
            Class::Failure
        );
        assert_eq!(
            c.classify_trailers(Some(&trailers("banana"))).class(),
            Class::Failure
        );
    }

    #[test]
    fn trailers_only_response_classified_from_headers() {
        let res = Response::builder()
            .header("grpc-status", "8")
            .header("grpc-retry-pushback-ms", "250")
            .body(())
            .unwrap();
        let c = Classify::<_, crate::BoxError>::classify(&GrpcClassifier::new(), Ok(&res));
        assert_eq!(c.class(), Class::Overload);
        assert_eq!(c.retry_after(), Some(Duration::from_millis(250)));
    }

    #[test]
    fn negative_pushback_forbids_retry() {
        let mut h = trailers("14");
        h.insert("grpc-retry-pushback-ms", "-1".parse().unwrap());
        assert!(
            !GrpcClassifier::new()
                .classify_trailers(Some(&h))
                .is_retryable()
        );
    }

    #[test]
    fn non_200_http_status_maps_to_grpc_code() {
        let c = GrpcClassifier::new()
            .classify_headers(http::StatusCode::BAD_GATEWAY, &HeaderMap::new())
            .unwrap();
        assert_eq!(c.class(), Class::Failure);
        assert!(c.is_retryable());
        assert!(
            GrpcClassifier::new()
                .classify_headers(http::StatusCode::OK, &HeaderMap::new())
                .is_none()
        );
    }

    #[test]
    fn overrides_change_a_code() {
        let c = GrpcClassifier::new()
            .with_failure(GrpcCode::Aborted, true)
            .with_success(GrpcCode::Unavailable);
        let aborted = c.classify_trailers(Some(&trailers("10")));
        assert!(aborted.is_failure() && aborted.is_retryable());
        assert!(c.classify_trailers(Some(&trailers("14"))).is_success());
    }
}
