//! HTTP classification: status codes, ranges, `Retry-After`.

use super::{AsError, Classification, Classify, classify_error};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header::RETRY_AFTER};
use std::fmt;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Classifies `http::Response`s by status, with user overrides.
///
/// Defaults:
///
/// | status | class | retryable |
/// |---|---|---|
/// | 1xx, 2xx, 3xx | success | no |
/// | 408 Request Timeout | failure that may have taken effect (tower-http's `TimeoutLayer::new` answers `408` when a *handler* runs too long; see below) | yes, if the request is retry-safe |
/// | 409 Conflict with `Retry-After` (the [idempotency layer](crate::idempotency)'s "request in progress": the first request with this key still runs) | ignored (the duplicate was refused; the server is healthy), no effect, hint from `Retry-After` | yes |
/// | 429 Too Many Requests | overload, hint from `Retry-After` | yes |
/// | 503 with `Retry-After` | overload, hint from `Retry-After` | yes |
/// | other 5xx (503 without `Retry-After` too) | failure | yes |
/// | other 4xx | success (says nothing about the server's health) | no |
/// | 200 with `grpc-status` (a gRPC answer, content type `application/grpc…`) | by its code, as [`GrpcClassifier`](super::GrpcClassifier) | |
///
/// A `408` is never taken for one that did nothing, though RFC 9110 §15.5.9 means it
/// so (the server did not receive the whole request, and closes the connection): a
/// handler timeout's `408` is as likely, and hyper marks *every* answer of a connection
/// whose keep-alive is off with `Connection: close` (a graceful shutdown, a client's own
/// `Connection: close`, `keep_alive(false)`), so that header does not tell them apart.
/// Where the dependency's `408`s are only the RFC's, say so:
/// `.with_status(StatusCode::REQUEST_TIMEOUT, Classification::failure().with_effect(false))`
/// retries them for a `POST` too.
///
/// The last row lets one HTTP stack (the [config](crate::config) client's) serve gRPC
/// calls too: a trailers-only `UNAVAILABLE` is a retryable failure, not a `200`
/// success. A status that comes in the trailers is seen only when
/// `postbox::grpc::GrpcStatusLayer` (feature `grpc`) moves it into the headers.
/// Errors are classified with [`classify_error`].
///
/// Overrides are checked before the defaults: first the closure set with
/// [`with_fn`](Self::with_fn), then the rules in the reverse order they were added (the
/// last one added wins). An overload either decides without a hint of its own takes
/// the response's `Retry-After`, and so does a retryable outcome for a status whose
/// default reads it (`409`, `429`, `503`; not another `5xx` made retryable).
///
/// # Example
/// ```
/// use http::StatusCode;
/// use postbox::classify::{Class, Classification, HttpClassifier};
///
/// let classifier = HttpClassifier::new()
///     // our dependency answers 409 when a lock is held: worth a retry
///     .with_status(StatusCode::CONFLICT, Classification::failure())
///     // 501 will never get better
///     .with_status(StatusCode::NOT_IMPLEMENTED, Classification::failure().with_retryable(false));
/// assert_eq!(classifier.classify_status(StatusCode::CONFLICT, &Default::default()).class(), Class::Failure);
/// ```
#[derive(Clone, Default)]
pub struct HttpClassifier {
    overrides: Option<Arc<Overrides>>,
}

type StatusFn = dyn Fn(StatusCode, &HeaderMap) -> Option<Classification> + Send + Sync;

#[derive(Default)]
struct Overrides {
    rules: Vec<(RangeInclusive<u16>, Classification)>,
    custom: Option<Arc<StatusFn>>,
}

// === impl HttpClassifier ===

impl HttpClassifier {
    /// The default HTTP classifier (see the table above).
    pub fn new() -> Self {
        Self::default()
    }

    fn overrides_mut(&mut self) -> &mut Overrides {
        let arc = self.overrides.get_or_insert_with(Default::default);
        if Arc::get_mut(arc).is_none() {
            let cloned = Overrides {
                rules: arc.rules.clone(),
                custom: arc.custom.clone(),
            };
            *arc = Arc::new(cloned);
        }
        Arc::get_mut(arc).expect("uniquely owned after copy-on-write")
    }

    /// Classifies `status` as `classification` (a server hint in `Retry-After` is still
    /// read for an overload without a hint of its own, and for a retryable one of a
    /// `409`, `429` or `503`).
    pub fn with_status(self, status: StatusCode, classification: Classification) -> Self {
        let code = status.as_u16();
        self.with_range(code..=code, classification)
    }

    /// Classifies every status in `range` (e.g. `500..=599`) as `classification`.
    pub fn with_range(
        mut self,
        range: RangeInclusive<u16>,
        classification: Classification,
    ) -> Self {
        self.overrides_mut().rules.push((range, classification));
        self
    }

    /// Shorthand for a retryable failure on `status`.
    pub fn with_failure(self, status: StatusCode) -> Self {
        self.with_status(status, Classification::failure())
    }

    /// Shorthand for a success (not retryable) on `status`.
    pub fn with_success(self, status: StatusCode) -> Self {
        self.with_status(status, Classification::success())
    }

    /// A closure asked first; `None` falls through to the rules and defaults.
    pub fn with_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(StatusCode, &HeaderMap) -> Option<Classification> + Send + Sync + 'static,
    {
        self.overrides_mut().custom = Some(Arc::new(f));
        self
    }

    /// Whether a rule or the closure of this classifier decides `status` (with these
    /// headers), rather than the defaults.
    pub(crate) fn overrides(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        self.overrides.as_ref().is_some_and(|o| {
            o.custom
                .as_ref()
                .is_some_and(|f| f(status, headers).is_some())
                || o.rules.iter().any(|(r, _)| r.contains(&status.as_u16()))
        })
    }

    /// Classifies a status and its headers.
    pub fn classify_status(&self, status: StatusCode, headers: &HeaderMap) -> Classification {
        if let Some(o) = &self.overrides {
            // An overload without a hint of its own takes the server's `Retry-After`,
            // whether the closure or a rule decided it; so does a retryable outcome
            // for a status whose default reads it (`409`, `429`, `503`: a `409` made a
            // retryable failure meets the idempotency layer's "in progress"). Not a
            // `5xx` made one: a proxy's `502` with `Retry-After: 3600` would end the
            // retries (a hint past `max_retry_after`), or hold a deferral an hour.
            let hinted = |c: Classification| {
                if c.retry_after().is_none()
                    && (c.class() == crate::classify::Class::Overload
                        || (c.is_retryable() && matches!(status.as_u16(), 409 | 429 | 503)))
                {
                    c.with_retry_after(retry_after(headers, SystemTime::now()))
                } else {
                    c
                }
            };
            if let Some(f) = &o.custom
                && let Some(c) = f(status, headers)
            {
                return hinted(c);
            }
            let code = status.as_u16();
            if let Some((_, c)) = o.rules.iter().rev().find(|(r, _)| r.contains(&code)) {
                return hinted(*c);
            }
        }
        default_status(status, headers)
    }
}

fn default_status(status: StatusCode, headers: &HeaderMap) -> Classification {
    // A gRPC answer with its status in the headers (trailers-only, or rewritten so by
    // `GrpcStatusLayer`) is decided by that status, as `GrpcClassifier` decides it:
    // under `200 OK` an `UNAVAILABLE` is no success.
    // (The content type first: a standard header, cheaper to look up.)
    if status == StatusCode::OK
        && crate::http::is_grpc(headers)
        && let Some(code) = super::grpc::GrpcCode::from_headers(headers)
    {
        return super::grpc::GrpcClassifier::new().classify_code(code, headers);
    }
    match status.as_u16() {
        // The RFC's 408 (the server did not receive the whole request) is as likely a
        // handler cut short by a server timeout (tower-http's `TimeoutLayer::new`),
        // which may have done its work; `Connection: close` does not tell them apart
        // (hyper adds it to every answer once a connection's keep-alive is off).
        408 => Classification::failure(),
        // The IETF idempotency-key draft's answer to a key whose first request is
        // still running, with when to ask again (our idempotency layer's): this copy
        // was refused, and says nothing of the server's health.
        409 => match retry_after(headers, SystemTime::now()) {
            Some(hint) => Classification::ignored()
                .with_retryable(true)
                .with_retry_after(Some(hint)),
            None => Classification::success(),
        },
        429 => Classification::overload(retry_after(headers, SystemTime::now())),
        503 => match retry_after(headers, SystemTime::now()) {
            Some(hint) => Classification::overload(Some(hint)),
            None => Classification::failure(),
        },
        500..=599 => Classification::failure(),
        _ => Classification::success(),
    }
}

impl fmt::Debug for HttpClassifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (rules, custom) = match &self.overrides {
            Some(o) => (o.rules.as_slice(), o.custom.is_some()),
            None => (&[][..], false),
        };
        f.debug_struct("HttpClassifier")
            .field("rules", &rules)
            .field("custom", &custom)
            .finish()
    }
}

impl<B, E: AsError> Classify<Response<B>, E> for HttpClassifier {
    fn classify(&self, outcome: Result<&Response<B>, &E>) -> Classification {
        match outcome {
            Ok(res) => self.classify_status(res.status(), res.headers()),
            Err(e) => e
                .as_error()
                .map_or_else(Classification::failure, classify_error),
        }
    }
}

/// Reads the `Retry-After` header: delay-seconds, or an HTTP-date measured from the
/// response's `Date` header when it has one (both are the server's clock, so a client
/// clock running fast does not retry early), else from `now`.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?;
    let sent = || {
        let date = headers.get(http::header::DATE)?.to_str().ok()?;
        httpdate::parse_http_date(date.trim()).ok()
    };
    match delay_seconds(value) {
        Some(delay) => delay,
        None => parse_retry_after(value, sent().unwrap_or(now)),
    }
}

/// `Some(hint)` if `value` is delay-seconds (`Some(None)` if it is not a valid one).
fn delay_seconds(value: &HeaderValue) -> Option<Option<Duration>> {
    let s = value.to_str().ok()?.trim();
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        // Too many seconds for a u64 is still a (very long) delay, not "no hint".
        .then(|| Some(s.parse::<u64>().map_or(Duration::MAX, Duration::from_secs)))
}

/// Parses a `Retry-After` value: delay-seconds (`"120"`) or an HTTP-date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`), relative to `now`.
///
/// A date in the past means "no wait" (`Some(Duration::ZERO)`); anything unparsable is
/// `None`.
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    if let Some(delay) = delay_seconds(value) {
        return delay;
    }
    let at = httpdate::parse_http_date(value.to_str().ok()?.trim()).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxError;
    use crate::classify::Class;

    /// An HTTP-date is read against the server's `Date`, not the client's clock: with
    /// the client 3 s fast, a retry at "5 s after the response" still waits 5 s.
    #[test]
    fn a_retry_after_date_is_measured_from_the_response_date() {
        let mut headers = HeaderMap::new();
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:05 GMT"),
        );
        let sent = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let fast_client = sent + Duration::from_secs(3);
        assert_eq!(
            retry_after(&headers, fast_client),
            Some(Duration::from_secs(2)),
            "without a Date, the client's clock"
        );
        headers.insert(
            http::header::DATE,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(
            retry_after(&headers, fast_client),
            Some(Duration::from_secs(5))
        );
        headers.insert(http::header::DATE, HeaderValue::from_static("yesterday"));
        assert_eq!(
            retry_after(&headers, fast_client),
            Some(Duration::from_secs(2)),
            "an unreadable Date is ignored"
        );
    }

    #[test]
    fn a_retry_after_too_large_for_a_u64_is_the_longest_delay_not_none() {
        let v = HeaderValue::from_static("99999999999999999999999");
        assert_eq!(
            parse_retry_after(&v, SystemTime::UNIX_EPOCH),
            Some(Duration::MAX)
        );
    }

    fn response(status: u16, retry_after: Option<&str>) -> Response<()> {
        let mut b = Response::builder().status(status);
        if let Some(v) = retry_after {
            b = b.header(RETRY_AFTER, v);
        }
        b.body(()).unwrap()
    }

    fn classify(c: &HttpClassifier, res: &Response<()>) -> Classification {
        Classify::<_, BoxError>::classify(c, Ok(res))
    }

    fn grpc_answer(content_type: &str, status: &'static str) -> Response<()> {
        Response::builder()
            .header(http::header::CONTENT_TYPE, content_type)
            .header("grpc-status", status)
            .body(())
            .unwrap()
    }

    /// One HTTP stack around a gRPC channel: a trailers-only `UNAVAILABLE` under
    /// `200 OK` is a retryable failure, an `INVALID_ARGUMENT` says nothing about the
    /// server's health, and `OK` is a success.
    #[test]
    fn a_grpc_status_in_the_headers_decides_a_grpc_answer() {
        let c = HttpClassifier::new();
        let unavailable = classify(&c, &grpc_answer("application/grpc", "14"));
        assert_eq!(unavailable.class(), Class::Failure);
        assert!(unavailable.is_retryable());
        let exhausted = classify(&c, &grpc_answer("application/grpc+proto", "8"));
        assert_eq!(exhausted.class(), Class::Overload);
        let internal = classify(&c, &grpc_answer("application/grpc-web", "13"));
        assert_eq!(internal.class(), Class::Failure);
        assert!(!internal.is_retryable());
        for ok in ["0", "3"] {
            let c = classify(&c, &grpc_answer("application/grpc", ok));
            assert_eq!(c.class(), Class::Success, "grpc-status {ok}");
            assert!(!c.is_retryable());
        }
    }

    /// The `grpc-status` of an answer that is not gRPC means nothing, and a rule the
    /// caller set for `200` still wins over it.
    #[test]
    fn a_grpc_status_outside_grpc_or_under_a_rule_is_not_read() {
        let c = HttpClassifier::new();
        let plain = classify(&c, &grpc_answer("application/json", "14"));
        assert_eq!(plain.class(), Class::Success);
        let ruled = HttpClassifier::new().with_success(StatusCode::OK);
        let c = classify(&ruled, &grpc_answer("application/grpc", "14"));
        assert_eq!(c.class(), Class::Success);
    }

    #[test]
    fn retry_after_seconds_parse() {
        let v = HeaderValue::from_static("120");
        assert_eq!(
            parse_retry_after(&v, SystemTime::now()),
            Some(Duration::from_secs(120))
        );
    }

    #[test]
    fn retry_after_http_date_parses_relative_to_now() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let v = HeaderValue::from_static("Wed, 21 Oct 2015 07:28:30 GMT");
        assert_eq!(parse_retry_after(&v, now), Some(Duration::from_secs(30)));
    }

    #[test]
    fn retry_after_http_date_in_the_past_means_no_wait() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        let v = HeaderValue::from_static("Wed, 21 Oct 2015 07:00:00 GMT");
        assert_eq!(parse_retry_after(&v, now), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_garbage_is_ignored() {
        let v = HeaderValue::from_static("soon");
        assert_eq!(parse_retry_after(&v, SystemTime::now()), None);
        let v = HeaderValue::from_static("-5");
        assert_eq!(parse_retry_after(&v, SystemTime::now()), None);
    }

    #[test]
    fn server_errors_are_retryable_failures() {
        let c = HttpClassifier::new();
        for s in [500, 502, 504] {
            let r = classify(&c, &response(s, None));
            assert_eq!(r.class(), Class::Failure, "{s}");
            assert!(r.is_retryable());
        }
    }

    #[test]
    fn too_many_requests_is_overload_with_hint() {
        let r = classify(&HttpClassifier::new(), &response(429, Some("2")));
        assert_eq!(r.class(), Class::Overload);
        assert_eq!(r.retry_after(), Some(Duration::from_secs(2)));
    }

    #[test]
    fn unavailable_with_retry_after_is_overload_without_is_failure() {
        let c = HttpClassifier::new();
        assert_eq!(
            classify(&c, &response(503, Some("1"))).class(),
            Class::Overload
        );
        assert_eq!(classify(&c, &response(503, None)).class(), Class::Failure);
    }

    #[test]
    fn client_errors_are_success_and_not_retryable() {
        let c = HttpClassifier::new();
        for s in [400, 401, 404, 409, 422] {
            let r = classify(&c, &response(s, None));
            assert_eq!(r.class(), Class::Success, "{s}");
            assert!(!r.is_retryable());
        }
    }

    /// A `409` with `Retry-After` (a duplicate refused while the key's first request
    /// runs) is retried after the hint and counted by no breaker; a plain `409` is a
    /// client error like any other.
    #[test]
    fn a_409_in_progress_is_retried_after_its_hint_and_counted_by_no_one() {
        let c = HttpClassifier::new();
        let r = classify(&c, &response(409, Some("2")));
        assert_eq!(r.class(), Class::Ignored);
        assert!(r.is_retryable());
        assert!(!r.may_have_taken_effect());
        assert_eq!(r.retry_after(), Some(Duration::from_secs(2)));
        let plain = classify(&c, &response(409, None));
        assert_eq!(plain.class(), Class::Success);
        assert!(!plain.is_retryable());
    }

    /// A 408 may be a handler cut short by a server timeout (tower-http's
    /// `TimeoutLayer::new`), which may have done its work, whether or not it closes its
    /// connection: hyper adds `Connection: close` to every answer once a connection's
    /// keep-alive is off (a graceful shutdown), so a `POST` without a key is not
    /// repeated. An override says a dependency's 408s are only the RFC's.
    #[test]
    fn a_408_may_have_taken_effect_even_when_it_closes_its_connection() {
        let c = HttpClassifier::new();
        for value in [None, Some("close"), Some("keep-alive, close")] {
            let mut res = response(408, None);
            if let Some(value) = value {
                res.headers_mut()
                    .insert(http::header::CONNECTION, value.parse().unwrap());
            }
            let timeout = classify(&c, &res);
            assert_eq!(timeout.class(), Class::Failure, "{value:?}");
            assert!(timeout.is_retryable());
            assert!(timeout.may_have_taken_effect(), "{value:?}");
        }
        let rfc = HttpClassifier::new().with_status(
            StatusCode::REQUEST_TIMEOUT,
            Classification::failure().with_effect(false),
        );
        assert!(!classify(&rfc, &response(408, None)).may_have_taken_effect());
    }

    #[test]
    fn overrides_by_status_range_and_closure() {
        let c = HttpClassifier::new()
            .with_range(500..=599, Classification::failure().with_retryable(false))
            .with_failure(StatusCode::CONFLICT)
            .with_fn(|s, _| (s == StatusCode::IM_A_TEAPOT).then(Classification::ignored));
        assert!(!classify(&c, &response(502, None)).is_retryable());
        assert_eq!(classify(&c, &response(409, None)).class(), Class::Failure);
        assert_eq!(classify(&c, &response(418, None)).class(), Class::Ignored);
        assert_eq!(classify(&c, &response(404, None)).class(), Class::Success);
    }

    /// An override that makes a status an overload without a hint of its own, by a
    /// rule or by the closure, takes the server's `Retry-After`; a hint of its own
    /// wins. So does one that makes a `409` a retryable failure (the documented
    /// `retryable_failure = [409]` meeting the idempotency layer's "in progress"),
    /// which waited only its backoff; a non-retryable one takes none, nor does a `502`
    /// made a retryable failure (a proxy's long `Retry-After` would end its retries).
    #[test]
    fn an_overload_override_without_a_hint_takes_the_servers_retry_after() {
        let by_closure = HttpClassifier::new()
            .with_fn(|s, _| (s == StatusCode::CONFLICT).then(|| Classification::overload(None)));
        let by_rule =
            HttpClassifier::new().with_status(StatusCode::CONFLICT, Classification::overload(None));
        for c in [&by_closure, &by_rule] {
            let r = classify(c, &response(409, Some("7")));
            assert_eq!(r.class(), Class::Overload);
            assert_eq!(r.retry_after(), Some(Duration::from_secs(7)), "{c:?}");
        }
        let own = HttpClassifier::new()
            .with_fn(|_, _| Some(Classification::overload(Some(Duration::from_secs(1)))));
        let r = classify(&own, &response(409, Some("7")));
        assert_eq!(r.retry_after(), Some(Duration::from_secs(1)));
        let failure = HttpClassifier::new().with_failure(StatusCode::CONFLICT);
        let r = classify(&failure, &response(409, Some("7")));
        assert_eq!(r.class(), Class::Failure);
        assert_eq!(r.retry_after(), Some(Duration::from_secs(7)));
        let final_failure = HttpClassifier::new().with_status(
            StatusCode::CONFLICT,
            Classification::failure().with_retryable(false),
        );
        assert_eq!(
            classify(&final_failure, &response(409, Some("7"))).retry_after(),
            None
        );
        let gateway = HttpClassifier::new().with_range(500..=599, Classification::failure());
        let r = classify(&gateway, &response(502, Some("3600")));
        assert!(r.is_retryable());
        assert_eq!(r.retry_after(), None);
    }

    #[test]
    fn clones_share_overrides_and_later_changes_do_not_leak() {
        let a = HttpClassifier::new().with_failure(StatusCode::CONFLICT);
        let b = a.clone().with_success(StatusCode::CONFLICT);
        assert_eq!(classify(&a, &response(409, None)).class(), Class::Failure);
        assert_eq!(classify(&b, &response(409, None)).class(), Class::Success);
    }
}
