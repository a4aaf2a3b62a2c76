use super::error::DeadlineExceeded;
use super::future::{DeadlineFuture, ResponseFuture};
use crate::BoxError;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower_service::Service;

/// Fails an attempt that runs longer than a timeout, dropping its future.
///
/// Errors become [`BoxError`]; an expiry is [`Elapsed`](super::error::Elapsed).
///
/// With [`HttpPropagation`] ([`AttemptTimeoutLayer::http`](super::AttemptTimeoutLayer::http))
/// the attempt's own end — its timeout, or the call's deadline if sooner — is what the
/// request carries to the next hop (`grpc-timeout`, `postbox-timeout-ms`, the
/// [`CallDeadline`] extension), so the server stops working on an attempt this side has
/// given up on, as gRPC's per-attempt timeouts do. An attempt whose call's deadline
/// has already passed is not made: it fails with [`DeadlineExceeded`] (expired before
/// the call).
///
/// # Cancel safety
/// Dropping the response future drops the inner future and the timer.
#[derive(Debug, Clone)]
pub struct AttemptTimeout<S, P = NoPropagation> {
    inner: S,
    timeout: Duration,
    propagate: P,
}

// === impl AttemptTimeout ===

impl<S, P> AttemptTimeout<S, P> {
    pub(crate) const fn new(inner: S, timeout: Duration, propagate: P) -> Self {
        Self {
            inner,
            timeout,
            propagate,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the layer, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, P, Req> Service<Req> for AttemptTimeout<S, P>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    P: Propagate<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut req: Req) -> Self::Future {
        if self.propagate.is_noop() {
            return ResponseFuture::new(self.inner.call(req), self.timeout);
        }
        let now = Instant::now();
        let end = crate::clock::later(now, self.timeout);
        let sent = self
            .propagate
            .inbound(&req, now)
            .map_or(end, |deadline| deadline.min(end));
        if sent <= now {
            // The call's deadline passed before this attempt (while a retry waited for
            // readiness): not sent with a zero timeout for the next hop to work on.
            tracing::debug!("deadline already exceeded; attempt not made");
            metrics::counter!(
                "postbox_calls_total",
                "layer" => "attempt_timeout",
                "outcome" => "deadline_exceeded"
            )
            .increment(1);
            return ResponseFuture::expired(DeadlineExceeded::new(Duration::ZERO, true));
        }
        let budget = sent.saturating_duration_since(now);
        self.propagate.outbound_attempt(&mut req, sent, budget);
        // Timed to the sooner of the two: the call's deadline may have no timer of its
        // own (a `grpc-timeout` the caller set, anchored by a retry layer outside).
        let call_bound = sent < end;
        let report = if call_bound { budget } else { self.timeout };
        ResponseFuture::until(self.inner.call(req), sent, report, call_bound)
    }
}

/// The deadline of a call, stored as a request extension by [`HttpPropagation`] so inner
/// layers and the handler can see how much time is left.
///
/// Inside an [`AttemptTimeoutLayer::http`](super::AttemptTimeoutLayer::http), [`at`](Self::at)
/// is the attempt's end (the sooner of its timeout and the call's deadline) and
/// [`call_at`](Self::call_at) still the whole call's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CallDeadline {
    at: Instant,
    call: Instant,
}

impl CallDeadline {
    /// A deadline at `at`, for the whole call.
    pub const fn new(at: Instant) -> Self {
        Self { at, call: at }
    }

    /// When the deadline passes: for an attempt, when the attempt ends.
    pub const fn at(&self) -> Instant {
        self.at
    }

    /// When the whole call's deadline passes: [`at`](Self::at), or inside an attempt
    /// timeout, the deadline outside it (what a response body read after the attempt
    /// has returned is bound by; see [`BodyDeadline`](super::BodyDeadline)).
    pub const fn call_at(&self) -> Instant {
        self.call
    }

    /// The time left at `now` (zero once passed).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.at.saturating_duration_since(now)
    }
}

/// How a [`Deadline`] travels with a request of type `Req`.
pub trait Propagate<Req> {
    /// A deadline the request already carries (an outer deadline, or one the previous
    /// hop sent); the earliest deadline wins.
    fn inbound(&self, req: &Req, now: Instant) -> Option<Instant>;

    /// Attaches the effective deadline to the request before it is sent.
    fn outbound(&self, req: &mut Req, deadline: Instant, remaining: Duration);

    /// Attaches one attempt's end to the request before it is sent: by default as
    /// [`outbound`](Self::outbound) does. ([`HttpPropagation`] keeps the call's own
    /// deadline in [`CallDeadline::call_at`].)
    fn outbound_attempt(&self, req: &mut Req, end: Instant, remaining: Duration) {
        self.outbound(req, end, remaining);
    }

    /// `true` if [`inbound`](Self::inbound) never finds a deadline and
    /// [`outbound`](Self::outbound) does nothing; the layer then reads no clock at call
    /// time and the budget starts at the end of the response future's first poll.
    fn is_noop(&self) -> bool {
        false
    }
}

/// Keeps the deadline to this layer: works for any request type.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPropagation;

impl<Req> Propagate<Req> for NoPropagation {
    #[inline]
    fn inbound(&self, _: &Req, _: Instant) -> Option<Instant> {
        None
    }

    #[inline]
    fn outbound(&self, _: &mut Req, _: Instant, _: Duration) {}

    #[inline]
    fn is_noop(&self) -> bool {
        true
    }
}

/// Bounds everything inside it by one time budget: all attempts and the backoff
/// between them.
///
/// A request whose (propagated) deadline has already passed fails with
/// [`DeadlineExceeded`] without calling the inner service. See the
/// [module docs](super) for propagation.
///
/// With a propagation (`DeadlineLayer::http`) the deadline
/// starts at `call`; without one ([`DeadlineLayer::new`](super::DeadlineLayer::new)) no
/// clock is read at `call` and it starts at the end of the response future's first
/// poll (see the [module docs](super)). Either
/// way, a wait for the inner service's readiness before it
/// (a bulkhead with [`backpressure`](crate::bulkhead::BulkheadBuilder::backpressure))
/// is not bounded by it; give such a wait its own bound (`max_wait`). A call failed
/// that way leaves what the inner `poll_ready` reserved (a bulkhead permit) with the
/// service until it is called again or dropped, as with any unused readiness: a
/// service used once per request (a clone, as axum and `oneshot` do) gives it back at
/// once.
///
/// # Cancel safety
/// Dropping the response future drops the inner future and the timer.
#[derive(Debug, Clone)]
pub struct Deadline<S, P = NoPropagation> {
    inner: S,
    budget: Duration,
    propagate: P,
}

// === impl Deadline ===

impl<S, P> Deadline<S, P> {
    pub(crate) const fn new(inner: S, budget: Duration, propagate: P) -> Self {
        Self {
            inner,
            budget,
            propagate,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the layer, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, P, Req> Service<Req> for Deadline<S, P>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    P: Propagate<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = DeadlineFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        if self.propagate.is_noop() {
            return DeadlineFuture::running(self.inner.call(req), None, self.budget);
        }
        let now = Instant::now();
        let mut deadline = crate::clock::later(now, self.budget);
        if let Some(inbound) = self.propagate.inbound(&req, now) {
            deadline = deadline.min(inbound);
        }
        let remaining = deadline.saturating_duration_since(now);
        if remaining.is_zero() {
            tracing::debug!("deadline already exceeded; not calling the inner service");
            metrics::counter!(
                "postbox_calls_total",
                "layer" => "deadline",
                "outcome" => "deadline_exceeded",
                "when" => "before_call"
            )
            .increment(1);
            return DeadlineFuture::expired(DeadlineExceeded::new(Duration::ZERO, true));
        }
        self.propagate.outbound(&mut req, deadline, remaining);
        DeadlineFuture::running(self.inner.call(req), Some(deadline), remaining)
    }
}

#[cfg(feature = "http")]
pub use self::http_propagation::{
    HttpPropagation, TIMEOUT_MS_HEADER, encode_grpc_timeout, parse_grpc_timeout,
};
#[cfg(feature = "http")]
pub(crate) use self::http_propagation::{
    anchor_caller_timeout, refresh_stale_deadline_headers, rewrite_deadline_headers,
};

#[cfg(feature = "http")]
mod http_propagation {
    use super::*;
    use http::{HeaderValue, Request};

    /// The HTTP header carrying the remaining time in whole milliseconds.
    pub const TIMEOUT_MS_HEADER: &str = "postbox-timeout-ms";

    /// Propagates the deadline of HTTP and gRPC requests.
    ///
    /// * inbound: a [`CallDeadline`] extension already on the request (an outer
    ///   deadline) and, with [`with_inbound_headers`](Self::with_inbound_headers) (for
    ///   servers), the `grpc-timeout` and [`TIMEOUT_MS_HEADER`] headers the previous
    ///   hop sent;
    /// * outbound: the [`CallDeadline`] extension, [`TIMEOUT_MS_HEADER`] with the
    ///   remaining milliseconds (rounded down, so the next hop gives up no later than
    ///   we do) and, for gRPC requests (`content-type: application/grpc…`),
    ///   `grpc-timeout`. A header already on the request with a shorter time (one the
    ///   caller set, as tonic's `Request::set_timeout` does) wins: the extension and
    ///   both headers then carry that time (the layer's own timer keeps its budget).
    ///   Beside a [`CallDeadline`], a header within a millisecond of it is taken for
    ///   the outer layer's copy of it, rounded down, not for a shorter limit.
    ///   A server that does not trust the previous hop uses
    ///   [`ignoring_inbound_headers`](Self::ignoring_inbound_headers): the headers
    ///   it received are then overwritten, never read.
    #[derive(Debug, Clone, Copy)]
    pub struct HttpPropagation {
        headers: Headers,
    }

    /// Which deadline headers already on the request count.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Headers {
        /// Client side: a shorter header the caller set wins on the way out.
        CallerSet,
        /// Server side, trusted: the previous hop's headers bound the deadline.
        Inbound,
        /// Server side, untrusted: headers on the request are ignored and overwritten.
        Ignored,
    }

    impl Default for HttpPropagation {
        fn default() -> Self {
            Self::new()
        }
    }

    impl HttpPropagation {
        /// Client-side propagation: trusts the request extension, and a shorter
        /// timeout header the caller set on the request.
        pub const fn new() -> Self {
            Self {
                headers: Headers::CallerSet,
            }
        }

        /// Also honours the deadline the previous hop sent in headers (server side).
        pub const fn with_inbound_headers(mut self) -> Self {
            self.headers = Headers::Inbound;
            self
        }

        /// Server side, when the previous hop is not trusted: the `grpc-timeout` and
        /// [`TIMEOUT_MS_HEADER`] headers on the request are ignored (a remote client
        /// sending `0` cannot cut the server's budget) and are overwritten with this
        /// layer's deadline for the handler and the hops after it.
        pub const fn ignoring_inbound_headers(mut self) -> Self {
            self.headers = Headers::Ignored;
            self
        }
    }

    impl<B> Propagate<Request<B>> for HttpPropagation {
        fn inbound(&self, req: &Request<B>, now: Instant) -> Option<Instant> {
            let ext = req.extensions().get::<CallDeadline>().map(CallDeadline::at);
            // (With a `CallDeadline`, a layer outside wrote the header with it, rounded
            // down to the millisecond: a deadline under 1 ms away reads `0` there and
            // is not over. The extension is exact.)
            if self.headers == Headers::CallerSet
                && ext.is_none()
                && header_timeout(req.headers(), is_grpc(req.headers())) == Some(Duration::ZERO)
            {
                // The caller left no time at all (`grpc-timeout: 0m`): failed before
                // the call, not sent with a deadline of now while our timer runs on.
                return Some(now);
            }
            if self.headers != Headers::Inbound {
                return ext;
            }
            let header = header_timeout(req.headers(), is_grpc(req.headers()))
                .map(|d| crate::clock::later(now, d));
            [ext, header].into_iter().flatten().min()
        }

        fn outbound(&self, req: &mut Request<B>, deadline: Instant, remaining: Duration) {
            let is_grpc = is_grpc(req.headers());
            // A shorter limit the caller set itself (tonic's `Request::set_timeout`
            // writes `grpc-timeout`) wins: the next hop must not work longer than the
            // caller asked, and a retry inside must not give each attempt that whole
            // limit again (it reads the `CallDeadline`). An untrusting server never
            // reads what a remote client sent. With a `CallDeadline`, a layer outside
            // may have written the headers from it, rounded down by under a millisecond:
            // only a limit shorter by more is the caller's (read as one, the milliseconds
            // header cut the deadline by up to a millisecond, to `0` under one).
            let set = match self.headers {
                Headers::Ignored => None,
                Headers::CallerSet | Headers::Inbound => {
                    let set = header_timeout(req.headers(), is_grpc);
                    if req.extensions().get::<CallDeadline>().is_some() {
                        set.filter(|&set| set.saturating_add(Duration::from_millis(1)) < remaining)
                    } else {
                        set
                    }
                }
            };
            let (deadline, remaining) = match set {
                Some(set) if set < remaining => {
                    let now = deadline.checked_sub(remaining).unwrap_or(deadline);
                    (crate::clock::later(now, set), set)
                }
                _ => (deadline, remaining),
            };
            req.extensions_mut().insert(CallDeadline::new(deadline));
            let headers = req.headers_mut();
            headers.insert(
                TIMEOUT_MS_HEADER,
                HeaderValue::from(u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX)),
            );
            if is_grpc && let Ok(v) = HeaderValue::from_str(&encode_grpc_timeout(remaining)) {
                headers.insert("grpc-timeout", v);
            } else if self.headers == Headers::Ignored {
                // Not ours to pass on: a gRPC server behind (tonic does not check the
                // content type) would obey a remote client's `grpc-timeout`.
                headers.remove("grpc-timeout");
            }
        }

        fn outbound_attempt(&self, req: &mut Request<B>, end: Instant, remaining: Duration) {
            // The call's deadline, from the layer outside (or the attempt's end, alone).
            let call = req
                .extensions()
                .get::<CallDeadline>()
                .map_or(end, CallDeadline::call_at);
            self.outbound(req, end, remaining);
            if let Some(d) = req.extensions_mut().get_mut::<CallDeadline>() {
                // Never before the attempt's own end (a caller-set shorter limit).
                d.call = call.max(d.at);
            }
        }
    }

    use crate::http::is_grpc;

    /// The deadline a caller set in the headers of a request that carries no
    /// [`CallDeadline`] (tonic's `Request::set_timeout` writes `grpc-timeout`), as a
    /// `CallDeadline` from now, so a retry layer can shrink it across attempts.
    /// Reads the content type only when there is a `grpc-timeout`, and the clock only
    /// when there is a timeout.
    pub(crate) fn anchor_caller_timeout<B>(req: &mut Request<B>) {
        if req.extensions().get::<CallDeadline>().is_some() {
            return;
        }
        let headers = req.headers();
        let grpc = headers.contains_key("grpc-timeout") && is_grpc(headers);
        if !grpc && !headers.contains_key(TIMEOUT_MS_HEADER) {
            return;
        }
        if let Some(set) = header_timeout(headers, grpc) {
            req.extensions_mut()
                .insert(CallDeadline::new(crate::clock::later(Instant::now(), set)));
        }
    }

    /// Rewrites the deadline headers `req` carries (`postbox-timeout-ms`,
    /// `grpc-timeout`) with the time left until `at`; adds none it does not carry. A
    /// [`CallDeadline`] inside an attempt keeps the whole call's deadline
    /// ([`call_at`](CallDeadline::call_at)), which a response body is held to.
    #[cold]
    #[inline(never)]
    pub(crate) fn rewrite_deadline_headers<B>(req: &mut Request<B>, at: Instant) {
        let had_ms = req.headers().contains_key(TIMEOUT_MS_HEADER);
        let had_grpc = req.headers().contains_key("grpc-timeout");
        let left = at.saturating_duration_since(Instant::now());
        HttpPropagation::new().outbound_attempt(req, at, left);
        if !had_ms {
            req.headers_mut().remove(TIMEOUT_MS_HEADER);
        }
        if !had_grpc {
            req.headers_mut().remove("grpc-timeout");
        }
    }

    /// After a wait between a `DeadlineLayer::http` and the call (a body read, a wait
    /// for readiness): rewrites the deadline headers of a request with a
    /// [`CallDeadline`] if they tell more time than is left, by a millisecond or more
    /// (the milliseconds header's unit).
    #[cold]
    #[inline(never)]
    pub(crate) fn refresh_stale_deadline_headers<B>(req: &mut Request<B>) {
        if let Some(at) = req.extensions().get::<CallDeadline>().map(CallDeadline::at)
            && header_is_stale(req.headers(), at)
        {
            rewrite_deadline_headers(req, at);
        }
    }

    /// Whether a deadline header (written earlier) tells more time than is left until
    /// `at`, by a millisecond or more (the milliseconds header's unit). Each is judged on
    /// its own: a `grpc-timeout` in microseconds is not excused by the milliseconds
    /// header rounded down beside it. False if there are none.
    fn header_is_stale(headers: &http::HeaderMap, at: Instant) -> bool {
        if !headers.contains_key(TIMEOUT_MS_HEADER) && !headers.contains_key("grpc-timeout") {
            return false;
        }
        let told = header_timeouts(headers, is_grpc(headers))
            .into_iter()
            .flatten()
            .max();
        let left = at.saturating_duration_since(Instant::now());
        told.is_some_and(|told| told >= left.saturating_add(Duration::from_millis(1)))
    }

    /// The shortest timeout in the request's headers: [`TIMEOUT_MS_HEADER`], and
    /// `grpc-timeout` on gRPC requests only (it means nothing on plain HTTP).
    fn header_timeout(headers: &http::HeaderMap, is_grpc: bool) -> Option<Duration> {
        header_timeouts(headers, is_grpc)
            .into_iter()
            .flatten()
            .min()
    }

    /// The timeouts `grpc-timeout` (on gRPC requests only) and [`TIMEOUT_MS_HEADER`]
    /// tell, each if present and readable.
    fn header_timeouts(headers: &http::HeaderMap, is_grpc: bool) -> [Option<Duration>; 2] {
        let grpc = headers
            .get("grpc-timeout")
            .filter(|_| is_grpc)
            .and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let ms = headers
            .get(TIMEOUT_MS_HEADER)
            .and_then(|v| {
                // Digits only: `u64::from_str` would take a sign (`+120`).
                let v = v.to_str().ok()?.trim();
                v.bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| v.parse::<u64>().ok())?
            })
            .map(Duration::from_millis);
        [grpc, ms]
    }

    /// Encodes a `grpc-timeout` value: at most 8 digits and a unit, choosing the finest
    /// unit that fits and rounding down, as the milliseconds header is, so the next hop
    /// gives up no later than we do (grpc-go rounds up: over 100 s its `m` value can be
    /// a millisecond later). A duration that is not zero never encodes as zero: the
    /// nanosecond unit is tried first.
    pub fn encode_grpc_timeout(d: Duration) -> String {
        const MAX: u128 = 99_999_999;
        let nanos = d.as_nanos();
        let units: [(u128, char); 6] = [
            (1, 'n'),
            (1_000, 'u'),
            (1_000_000, 'm'),
            (1_000_000_000, 'S'),
            (60_000_000_000, 'M'),
            (3_600_000_000_000, 'H'),
        ];
        for (per, unit) in units {
            let v = nanos / per;
            if v <= MAX {
                return format!("{v}{unit}");
            }
        }
        format!("{MAX}H")
    }

    /// Parses a `grpc-timeout` value (`"250m"`, `"3S"`, …).
    pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
        let (&unit, digits) = v.split_last()?;
        if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
        Some(match unit {
            b'H' => Duration::from_secs(n * 3600),
            b'M' => Duration::from_secs(n * 60),
            b'S' => Duration::from_secs(n),
            b'm' => Duration::from_millis(n),
            b'u' => Duration::from_micros(n),
            b'n' => Duration::from_nanos(n),
            _ => return None,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn grpc_timeout_encodes_in_finest_unit_that_fits() {
            assert_eq!(encode_grpc_timeout(Duration::from_millis(50)), "50000000n");
            assert_eq!(encode_grpc_timeout(Duration::from_secs(2)), "2000000u");
            assert_eq!(encode_grpc_timeout(Duration::from_secs(1000)), "1000000m");
            assert_eq!(encode_grpc_timeout(Duration::from_secs(200_000)), "200000S");
            // Rounded down: never later than the deadline it carries.
            assert_eq!(
                encode_grpc_timeout(Duration::from_millis(100_000) + Duration::from_nanos(1)),
                "100000m"
            );
            assert_eq!(encode_grpc_timeout(Duration::from_nanos(1)), "1n");
        }

        /// Stale headers rewritten inside an attempt (a wait for readiness behind a
        /// `BufferBodyLayer`) keep the whole call's deadline, which the response body
        /// is held to: only the attempt's end is told again.
        #[tokio::test(start_paused = true)]
        async fn a_rewrite_inside_an_attempt_keeps_the_calls_deadline() {
            let start = Instant::now();
            let mut req = Request::new(());
            req.extensions_mut().insert(CallDeadline {
                at: start + Duration::from_secs(2),
                call: start + Duration::from_secs(10),
            });
            req.headers_mut()
                .insert(TIMEOUT_MS_HEADER, HeaderValue::from_static("2000"));
            tokio::time::advance(Duration::from_millis(5)).await;
            refresh_stale_deadline_headers(&mut req);
            let d = req.extensions().get::<CallDeadline>().unwrap();
            assert_eq!(d.at(), start + Duration::from_secs(2));
            assert_eq!(d.call_at(), start + Duration::from_secs(10));
            assert_eq!(req.headers()[TIMEOUT_MS_HEADER], "1995");
        }

        /// A `grpc-timeout` in microseconds that tells a millisecond more than is left
        /// is rewritten, though the milliseconds header beside it (rounded down) does
        /// not yet: each header is judged on its own. (Judged on the shorter of the two,
        /// the next hop was told up to 2 ms past the deadline.)
        #[tokio::test(start_paused = true)]
        async fn a_grpc_timeout_past_the_deadline_is_rewritten_beside_a_rounded_ms_header() {
            let at = Instant::now() + Duration::from_micros(1_500_900);
            let mut req = Request::new(());
            req.extensions_mut().insert(CallDeadline::new(at));
            let h = req.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/grpc"));
            h.insert("grpc-timeout", HeaderValue::from_static("1500900u"));
            h.insert(TIMEOUT_MS_HEADER, HeaderValue::from_static("1500"));
            tokio::time::advance(Duration::from_micros(1_800)).await;
            refresh_stale_deadline_headers(&mut req);
            let told = parse_grpc_timeout(req.headers()["grpc-timeout"].as_bytes()).unwrap();
            assert_eq!(told, at - Instant::now());
            assert_eq!(req.headers()[TIMEOUT_MS_HEADER], "1499");
        }

        #[test]
        fn grpc_timeout_round_trips() {
            for d in [
                Duration::from_nanos(7),
                Duration::from_millis(1234),
                Duration::from_secs(86_400),
            ] {
                let s = encode_grpc_timeout(d);
                assert_eq!(parse_grpc_timeout(s.as_bytes()), Some(d), "{s}");
            }
            assert_eq!(parse_grpc_timeout(b"123456789m"), None);
            assert_eq!(parse_grpc_timeout(b"5x"), None);
            assert_eq!(parse_grpc_timeout(b"m"), None);
        }
    }
}
