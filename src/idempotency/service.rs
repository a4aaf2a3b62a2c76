use super::fingerprint::{self, FingerprintedBody, Hasher, Tap};
use super::future::ResponseFuture;
use super::store::{Claim, ClaimToken, IdempotencyStore, StoredResponse};
use crate::BoxError;
use crate::classify::grpc::GrpcCode;
use crate::enqueue::BufferedBody;
use crate::enqueue::body::{Collected, partial, poll_collect};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower_service::Service;
use tracing::Instrument;

/// Header set on a response answered from the store (value `true`).
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Put in a response's extensions by a handler whose answer is a stream (NDJSON
/// progress, a long poll, a chunked export): the [`Idempotency`] layer sends it on as
/// it comes instead of reading it whole to remember it, and releases the key, so a
/// repeat runs the handler again. Without it such an answer is held back until it ends
/// or passes `max_body` (server-sent events, `text/event-stream`, are recognised
/// without it).
///
/// ```
/// use postbox::idempotency::StreamThrough;
///
/// let mut res = http::Response::new(String::from("{\"progress\":0}\n"));
/// res.extensions_mut().insert(StreamThrough);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamThrough;

/// Settings of one [`IdempotencyLayer`](super::IdempotencyLayer).
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) header: HeaderName,
    pub(crate) ttl: Duration,
    pub(crate) lock_for: Duration,
    pub(crate) max_body: usize,
    /// A header whose value scopes the keys (the caller's identity).
    /// [`scope_by`](super::IdempotencyLayer::scope_by) headers (none: unscoped).
    pub(crate) scope: Arc<[HeaderName]>,
    /// gRPC methods whose calls pass through as if they had no key (streaming ones).
    pub(crate) stream_through: Vec<String>,
    /// A request of an unsafe method without a usable key is refused (`400`).
    pub(crate) require_key: bool,
}

/// Answers repeated requests with the same `Idempotency-Key` from a store instead of
/// running the handler again; see the [module docs](super).
///
/// The response body becomes [`BufferedBody<ResBody>`]: fully buffered when it was
/// read to be remembered (up to `max_body`), whether or not it was then stored (a gRPC
/// answer ending in `INTERNAL`, a refusal before the request body was read, a store
/// that failed), and when replayed; streamed through when its head alone says it is not
/// remembered (a status, an event stream, a `stream_through` method). Errors are the
/// inner service's, unchanged (axum's `Infallible` stays `Infallible`).
///
/// # Clone
/// A request with a key moves the ready inner service into its response future (a
/// clone takes its place), so the inner service must be `Clone`, as every axum service
/// is. Clones share the store.
///
/// # Cancel safety
/// A request that claimed a key runs in a task of its own (on the current Tokio
/// runtime): the handler, then reading and storing its response. Dropping the response
/// future (the client went away, a caller that timed out and will retry, or a deadline
/// layer outside gave up) does not cancel the handler, so a handler is never cut off
/// between its effect and its answer, which would leave the key free for the retry to
/// make the effect twice: a waiting duplicate gets the stored answer instead. While the
/// response future lives the claim is renewed; once it is dropped, the task runs until
/// the claim expires (at most `lock_for` later), then it is cancelled and the claim
/// released. Put a bulkhead *inside*
/// this layer (as the server stack does): its permit then stays with the handler until
/// the handler ends. The request body of a client that went away fails; a response to
/// a request whose body failed is not remembered.
pub struct Idempotency<S, St> {
    inner: S,
    store: Arc<St>,
    config: Arc<Config>,
}

// === impl Idempotency ===

impl<S, St> Idempotency<S, St> {
    pub(crate) fn new(inner: S, store: Arc<St>, config: Arc<Config>) -> Self {
        Self {
            inner,
            store,
            config,
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

    /// Whether calls to `path` pass through as if they had no key.
    fn streams_through(&self, path: &str) -> bool {
        self.config
            .stream_through
            .iter()
            .any(|m| crate::http::names_method(m, path))
    }
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.store.clone(), self.config.clone())
    }
}

impl<S: fmt::Debug, St: fmt::Debug> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}

impl<S, St, B, ResBody> Service<Request<B>> for Idempotency<S, St>
where
    S: Service<Request<FingerprintedBody<B>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Send,
    St: IdempotencyStore,
    B: Body + Send + 'static,
    ResBody: Body + Unpin + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<BufferedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(key) = req
            .headers()
            .get(&self.config.header)
            .and_then(crate::http::idempotency_key::key_in)
            .filter(|_| !self.streams_through(req.uri().path()))
        else {
            if self.config.require_key
                && !crate::http::idempotency_key::is_safe_method(req.method())
                && !self.streams_through(req.uri().path())
            {
                return missing_key(&req, &self.config.header);
            }
            return ResponseFuture::passthrough(
                self.inner.call(req.map(FingerprintedBody::untapped)),
            );
        };
        // Keys are scoped to the method, host and path: the same key on another
        // endpoint, or on another virtual host served by the same stack, is another
        // operation (and, if asked, to the caller).
        let host = Host(&req);
        let scoped = if self.config.scope.is_empty() {
            format!("{} {host}{} {key}", req.method(), req.uri().path())
        } else {
            let values: Vec<_> = self
                .config
                .scope
                .iter()
                .map(|header| scope_value(req.headers(), header))
                .collect();
            format!(
                "{} {host}{} {:016x} {key}",
                req.method(),
                req.uri().path(),
                Hasher::of_scope(values.iter().map(|v| v.as_deref()))
            )
        };
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        let fut = keyed(svc, req, scoped, self.store.clone(), self.config.clone());
        ResponseFuture::keyed(Box::pin(fut))
    }
}

/// Every value of the scope header `name`, as one: a repeated header (HTTP/2 sends a
/// `Cookie` as one field per cookie) joined as HTTP/1.1 would send it, `; ` for
/// cookies, `, ` for the rest; `None` if absent. (Only the first value counted: with
/// `scope_by(COOKIE)`, two callers whose first cookie was the same, `lang=en`, shared
/// a scope, and the second got the first's stored answer.)
fn scope_value<'a>(
    headers: &'a http::HeaderMap,
    name: &HeaderName,
) -> Option<std::borrow::Cow<'a, [u8]>> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    let Some(second) = all.next() else {
        return Some(std::borrow::Cow::Borrowed(first.as_bytes()));
    };
    let sep: &[u8] = if name == http::header::COOKIE {
        b"; "
    } else {
        b", "
    };
    let mut joined = first.as_bytes().to_vec();
    for v in std::iter::once(second).chain(all) {
        joined.extend_from_slice(sep);
        joined.extend_from_slice(v.as_bytes());
    }
    Some(std::borrow::Cow::Owned(joined))
}

/// The host a request is for, as it goes into its scoped key: the URI's authority
/// (HTTP/2's `:authority`), else the `Host` header, else nothing; without userinfo,
/// lower-cased (hosts compare without regard to case).
struct Host<'a, B>(&'a Request<B>);

impl<B> std::fmt::Display for Host<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = crate::http::host_of(self.0.uri(), self.0.headers()).unwrap_or_default();
        host.chars()
            .try_for_each(|c| std::fmt::Write::write_char(f, c.to_ascii_lowercase()))
    }
}

/// How long before the call's deadline a duplicate stops waiting for its key, to answer
/// `409` before the deadline answers for it.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// How long a waiting duplicate pauses after its claim failed (the store down), before
/// it claims again.
const STORE_FAILED_PAUSE: Duration = Duration::from_millis(50);

/// Gives the claim back if the request does not complete it.
struct Release<St: IdempotencyStore> {
    store: Arc<St>,
    key: String,
    token: ClaimToken,
    armed: bool,
}

impl<St: IdempotencyStore> Drop for Release<St> {
    fn drop(&mut self) {
        if self.armed {
            self.store.release(&self.key, self.token);
        }
    }
}

async fn keyed<S, St, B, ResBody>(
    mut svc: S,
    req: Request<B>,
    key: String,
    store: Arc<St>,
    config: Arc<Config>,
) -> Result<Response<BufferedBody<ResBody>>, S::Error>
where
    S: Service<Request<FingerprintedBody<B>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Send,
    St: IdempotencyStore,
    B: Body + Send + 'static,
    ResBody: Body + Unpin + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let head = Hasher::of_head(&req);
    // The layer's own answers to a gRPC request are gRPC statuses.
    let grpc = crate::http::grpc_kind(req.headers());
    let mut ready = true;
    // A duplicate waits for the key at most `lock_for` in all, however often it comes
    // free and is claimed again by another duplicate (a handler that keeps failing),
    // then is answered `409` as the IETF draft says for a request still in progress.
    let mut wait_until: Option<tokio::time::Instant> = None;
    // Within a deadline (a `DeadlineLayer` outside sets it), the wait ends a little
    // before it: the duplicate gets `409` and `Retry-After`, "retry with this key",
    // instead of the deadline's `504`, which says nothing of the first request.
    let call_deadline = req
        .extensions()
        .get::<crate::timeout::CallDeadline>()
        .map(|d| d.at().checked_sub(DEADLINE_MARGIN).unwrap_or(d.at()));
    // Set once the bound is reached: one more claim, then `409`.
    let mut last_claim = false;
    let (token, mut claim_ends) = loop {
        // When the claim expires and a duplicate may take the key over (reckoned from
        // before the claim was asked for, so never later than the store's own expiry).
        let claim_ends = crate::clock::later(tokio::time::Instant::now(), config.lock_for);
        let claimed = match store.claim(&key, config.lock_for).await {
            // A duplicate that saw the key taken: a store failing now (a blip, one of
            // the many claims a polling wait makes) says nothing of the first request
            // ending, and running the handler beside it would make its effect twice.
            // It waits on, to its bound (then `409`).
            Err(e) if wait_until.is_some() => {
                tracing::debug!(error = %e, %key, "idempotency store failed while a duplicate waits; waiting on");
                // Paced here too: a store's `wait` may end at once while it is down.
                // Not past the wait's bound (the call's deadline may follow it), nor
                // before the last claim's answer.
                if !last_claim
                    && let Some(until) = wait_until
                    && tokio::runtime::Handle::try_current().is_ok()
                {
                    let pause =
                        crate::clock::later(tokio::time::Instant::now(), STORE_FAILED_PAUSE);
                    tokio::time::sleep_until(pause.min(until)).await;
                }
                Ok(Claim::InProgress)
            }
            claimed => claimed,
        };
        match claimed {
            Ok(Claim::Proceed(token)) => break (token, claim_ends),
            Ok(Claim::Done(stored)) => {
                // Answered from the store: the readied service (a bulkhead permit it
                // reserved) is not held while the repeat's body is read to compare.
                drop(svc);
                if let Some(first) = stored.fingerprint {
                    // A repeat must be the same request: read its body (no further
                    // than the first one's length) to compare, or only its head if
                    // the first one's body was not read.
                    let fingerprint = if first.is_head_only() {
                        Ok(Some(Hasher::head_only(&head)))
                    } else {
                        fingerprint::of_body(req.into_body(), head, first.body_len).await
                    };
                    if fingerprint == Err(()) {
                        tracing::debug!(%key, "repeat's body unreadable; not compared");
                        metrics::counter!("postbox_calls_total", "layer" => "idempotency", "outcome" => "body_unreadable")
                            .increment(1);
                        return Ok(problem(
                            grpc,
                            StatusCode::BAD_REQUEST,
                            "Request body unreadable",
                            "The request body could not be read to compare it with the \
                             request that first used this Idempotency-Key.",
                        ));
                    }
                    if fingerprint != Ok(Some(first)) {
                        tracing::debug!(%key, "idempotency key reused for another request");
                        metrics::counter!("postbox_calls_total", "layer" => "idempotency", "outcome" => "key_reused")
                            .increment(1);
                        return Ok(problem(
                            grpc,
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Idempotency-Key is already used",
                            "This Idempotency-Key was used with a different request: \
                             another query, content type or body.",
                        ));
                    }
                }
                tracing::debug!(%key, "answered from the idempotency store");
                metrics::counter!("postbox_calls_total", "layer" => "idempotency", "outcome" => "replayed")
                    .increment(1);
                return Ok(replayed(stored));
            }
            Ok(Claim::InProgress) => {
                // Waiting must not hold what the ready service reserved (a bulkhead
                // permit inside): an unready clone waits instead, readied if the key
                // comes free.
                if ready {
                    svc = svc.clone();
                    ready = false;
                }
                let until = *wait_until.get_or_insert_with(|| {
                    let bound = crate::clock::later(tokio::time::Instant::now(), config.lock_for);
                    call_deadline.map_or(bound, |at| bound.min(at))
                });
                // At the bound the key is claimed once more before answering: a hung
                // first request's claim ends then for a duplicate that came at once
                // (and a polling store's wait may have slept past it).
                if last_claim {
                    tracing::debug!(%key, "duplicate waited its whole bound for the key");
                    metrics::counter!("postbox_calls_total", "layer" => "idempotency", "outcome" => "in_progress")
                        .increment(1);
                    let mut res = problem(
                        grpc,
                        StatusCode::CONFLICT,
                        "Request in progress",
                        "A request with this Idempotency-Key is still in progress; retry \
                         later with the same key.",
                    );
                    // Says "later", not "never": the replayer retries a `409` that
                    // carries it instead of dead-lettering the message.
                    res.headers_mut()
                        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return Ok(res);
                }
                let waited = if tokio::time::Instant::now() >= until {
                    false
                } else if tokio::runtime::Handle::try_current().is_ok() {
                    tokio::time::timeout_at(until, store.wait(&key))
                        .await
                        .is_ok()
                } else {
                    store.wait(&key).await; // no timer: checked on the next round
                    true
                };
                last_claim = !waited;
            }
            Err(e) => {
                tracing::warn!(error = %e, %key, "idempotency store failed; running the handler");
                metrics::counter!("postbox_calls_total", "layer" => "idempotency", "outcome" => "store_failed")
                    .increment(1);
                if !ready {
                    std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
                }
                let res = svc.call(req.map(FingerprintedBody::untapped)).await?;
                return Ok(res.map(BufferedBody::streaming));
            }
        }
    };
    // To renew the claim while the handler runs (the claim itself moves into the work).
    let renewal = (store.clone(), key.clone(), config.lock_for);
    let claim = Release {
        store: store.clone(),
        key,
        token,
        armed: true,
    };
    if !ready {
        // The claim goes back if this fails (or is dropped meanwhile), and if the
        // service is not ready before the claim ends: past it a duplicate may take the
        // key over, and both would run the handler.
        let ready = std::future::poll_fn(|cx| svc.poll_ready(cx));
        let readied = if tokio::runtime::Handle::try_current().is_ok() {
            tokio::time::timeout_at(claim_ends, ready).await.ok()
        } else {
            // No timer without a runtime: checked once ready instead.
            let r = ready.await;
            (tokio::time::Instant::now() < claim_ends).then_some(r)
        };
        if readied.transpose()?.is_none() {
            tracing::debug!(key = %claim.key, "service not ready before the claim ended");
            metrics::counter!("postbox_calls_total", "layer" => "idempotency", "outcome" => "claim_expired")
                .increment(1);
            let mut res = problem(
                grpc,
                StatusCode::SERVICE_UNAVAILABLE,
                "Service busy",
                "The service did not become ready before this request's hold on its \
                 Idempotency-Key expired; retry with the same key.",
            );
            // As the `409`'s: when to come back (a full bulkhead's `503` says so too).
            res.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Ok(res);
        }
        // The wait used up part of the claim: renewed now, so the handler starts with
        // the whole `lock_for` ahead of it. (Else, its client gone before the first
        // renewal, it was cut off, and the key given away, `lock_for` after the claim
        // rather than after its start: a handler that needed less than `lock_for` ran
        // again for the retry.)
        if tokio::runtime::Handle::try_current().is_ok()
            && let Ok(Some(ends)) = extend_claim(
                &*store,
                &claim.key,
                claim.token,
                config.lock_for,
                claim_ends,
            )
            .await
        {
            claim_ends = ends;
        }
    }
    let (parts, body) = req.into_parts();
    let (body, tap) = FingerprintedBody::tapped(body, head);
    let req = Request::from_parts(parts, body);
    // A claimed request runs to its end even if this future is dropped (the client went
    // away, or a deadline outside gave up on it): a handler cut off after its effect but
    // before its answer would leave the key free, and the caller's retry (or the
    // replayer) would make the effect twice. Its duplicate waits and gets the stored
    // answer instead. Hence a task of its own (inline without a runtime).
    let (alive, gone) = tokio::sync::oneshot::channel::<()>();
    let grpc_call = grpc.is_some();
    let work = async move {
        let res = match svc.call(req).await {
            Ok(res) => res,
            Err(e) => return Handled::Failed(e),
        };
        if !remembered(res.status(), res.headers(), grpc_call)
            || tap.failed()
            || is_event_stream(&res)
            || res.extensions().get::<StreamThrough>().is_some()
        {
            // Not remembered: a later attempt may succeed (or, for a request whose body
            // failed to arrive, send it whole). The claim is released here.
            return Handled::Streamed(res);
        }
        let (parts, body) = res.into_parts();
        let outcome = collect_and_store(
            body,
            claim,
            store,
            config,
            AnswerHead {
                status: parts.status,
                headers: end_to_end(&parts.headers),
                grpc_call,
            },
            tap,
        )
        .await;
        Handled::Read(parts, outcome)
    };
    // While the client waits, the claim is renewed half-way through what is left of it, so
    // a handler slower than `lock_for` keeps its key: past the claim a duplicate would
    // run the handler while this one still runs. Once the client has gone, the work
    // goes on until the claim expires, no longer: a handler or body that never ends
    // must not keep the task alive.
    let runtime = tokio::runtime::Handle::try_current().ok();
    let has_runtime = runtime.is_some();
    let bounded = async move {
        let (store, key, lock_for) = renewal;
        let mut work = std::pin::pin!(work);
        let mut gone = std::pin::pin!(gone);
        // No timer without a runtime (run inline): nothing to renew with, and the client
        // cannot go away from under this future.
        let (mut claim_ends, mut client_gone, mut renewing) = (claim_ends, false, has_runtime);
        loop {
            // Not renewed, the handler goes on for its client: no timer.
            let timed = client_gone || renewing;
            // Built (the clock read, the timer armed) only when polled, after the work
            // was polled first: a handler that answers at once costs no timer.
            let wake = async {
                let at = if client_gone {
                    claim_ends
                } else {
                    // Half-way through what is left of the claim (never past it, and
                    // no overflow for a `lock_for` of `Duration::MAX`).
                    let now = tokio::time::Instant::now();
                    now + claim_ends.saturating_duration_since(now) / 2
                };
                tokio::time::sleep_until(at).await;
            };
            // Once the client has gone, the work is not polled past the claim's end, not
            // even in the tick the cut-off fires in: a duplicate may have taken the key
            // over at that instant. (The clock is read only then.)
            let cut_off = client_gone.then_some(claim_ends);
            let work_in_claim = std::future::poll_fn(|cx| match cut_off {
                Some(at) if tokio::time::Instant::now() >= at => Poll::Pending,
                _ => work.as_mut().poll(cx),
            });
            tokio::select! {
                biased;
                handled = work_in_claim => return handled,
                _ = &mut gone, if !client_gone => client_gone = true,
                () = wake, if timed => {
                    if client_gone {
                        return Handled::Abandoned;
                    }
                    // The handler is not polled meanwhile: a store that does not answer
                    // is given up on when the claim ends (it held the handler, and the
                    // cut-off once the client left, for as long as it hung).
                    match extend_claim(&*store, &key, token, lock_for, claim_ends).await {
                        Ok(Some(ends)) => claim_ends = ends,
                        // Taken over, or a store that cannot renew: past the claim a
                        // duplicate may take the key over.
                        Ok(None) => renewing = false,
                        Err(e) => {
                            // Tried again half-way through what is left, while more
                            // than an eighth of `lock_for` is (a few tries, not a
                            // loop as the claim runs out): one failed round trip
                            // must not give the key away.
                            let left = claim_ends.saturating_duration_since(tokio::time::Instant::now());
                            renewing = left > lock_for / 8;
                            tracing::warn!(error = %e, %key, again = renewing, "idempotency store failed to renew a claim");
                        }
                    }
                }
            }
        }
    };
    let handled = match runtime {
        Some(rt) => match rt.spawn(bounded.in_current_span()).await {
            Ok(handled) => handled,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Handled::Abandoned,
        },
        None => bounded.await,
    };
    drop(alive);
    Ok(match handled {
        Handled::Failed(e) => return Err(e),
        Handled::Streamed(res) => res.map(BufferedBody::streaming),
        Handled::Read(parts, Outcome::Whole(bytes, trailers)) => {
            Response::from_parts(parts, BufferedBody::full_with_trailers(bytes, trailers))
        }
        Handled::Read(parts, Outcome::Over(buf, extra, body)) => {
            Response::from_parts(parts, partial(buf, extra, body))
        }
        Handled::Read(parts, Outcome::Failed(e)) => {
            Response::from_parts(parts, BufferedBody::failed(e))
        }
        // Only once the client is gone, or as the runtime shuts down: nobody reads it.
        Handled::Abandoned => problem(
            grpc,
            StatusCode::SERVICE_UNAVAILABLE,
            "Request abandoned",
            "The request was abandoned before it completed.",
        ),
    })
}

/// Extends the claim `token` on `key` to `lock_for` from now, waiting for the store no
/// longer than the claim lasts (`ends`): the claim's new end, `None` if the store did
/// not extend it (taken over, or a store that cannot), or the store's error.
async fn extend_claim<St: IdempotencyStore>(
    store: &St,
    key: &str,
    token: ClaimToken,
    lock_for: Duration,
    ends: tokio::time::Instant,
) -> Result<Option<tokio::time::Instant>, BoxError> {
    let asked = tokio::time::Instant::now();
    let left = ends.saturating_duration_since(asked);
    match tokio::time::timeout(left, store.extend(key, token, lock_for)).await {
        Ok(Ok(true)) => Ok(Some(crate::clock::later(asked, lock_for))),
        Ok(Ok(false)) => Ok(None),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no answer before the claim ended".into()),
    }
}

/// How a claimed request ended, in its task.
enum Handled<B, E> {
    /// The handler failed (the claim is released).
    Failed(E),
    /// An answer that is not remembered, to stream through (the claim is released).
    Streamed(Response<B>),
    /// An answer read to be remembered.
    Read(http::response::Parts, Outcome<B>),
    /// Given up after the client went away (or the runtime shut down).
    Abandoned,
}

/// How reading a response body to remember it ended.
enum Outcome<B> {
    /// Read whole, with its trailers if it had some (and stored, unless the store
    /// failed or the trailers hold a gRPC status that is not remembered).
    Whole(Bytes, Option<http::HeaderMap>),
    /// Over the limit: what was read, and the rest to stream. Not remembered.
    Over(Collected, Option<Frame<Bytes>>, B),
    /// The body failed. Not remembered.
    Failed(BoxError),
}

/// The head of an answer to store: its status, its end-to-end headers, and whether it
/// answers a gRPC request.
struct AnswerHead {
    status: http::StatusCode,
    headers: http::HeaderMap,
    grpc_call: bool,
}

/// Reads the response `body` whole and stores it as the key's outcome; the claim is
/// released if that does not happen.
async fn collect_and_store<St, B>(
    mut body: B,
    mut claim: Release<St>,
    store: Arc<St>,
    config: Arc<Config>,
    head: AnswerHead,
    tap: Arc<Tap>,
) -> Outcome<B>
where
    St: IdempotencyStore,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    let AnswerHead {
        status,
        headers,
        grpc_call,
    } = head;
    let mut buf = Collected::default();
    let mut extra = None;
    let whole = std::future::poll_fn(|cx| {
        poll_collect(
            Pin::new(&mut body),
            cx,
            &mut buf,
            config.max_body,
            &mut extra,
        )
    })
    .await;
    // Trailers end a body: with them it is whole too.
    let trailers = match extra.take().map(Frame::into_trailers) {
        Some(Ok(trailers)) => Some(trailers),
        Some(Err(data)) => {
            extra = Some(data);
            None
        }
        None => None,
    };
    match whole {
        Err(e) => Outcome::Failed(e),
        Ok(false) if trailers.is_none() => {
            tracing::debug!(key = %claim.key, "response over the limit; not remembered");
            Outcome::Over(buf, extra, body)
        }
        Ok(_) => {
            let bytes = buf.freeze();
            let connect = connect_stream_end(&headers, &bytes);
            // A gRPC call's outcome is the status in its trailers, under a `200 OK` (a
            // gRPC response without any status, or a gRPC request's answer from
            // something that is no gRPC server, is `UNKNOWN` to its client).
            let code = trailers
                .as_ref()
                .and_then(GrpcCode::from_headers)
                .or_else(|| GrpcCode::from_headers(&headers))
                .or_else(|| grpc_web_status(&headers, &bytes))
                .or_else(|| connect.map(|end| end.code))
                .or_else(|| {
                    (grpc_call || crate::http::is_grpc(&headers)).then_some(GrpcCode::Unknown)
                });
            if let Some(code) = code.filter(|c| !remembered_grpc(*c)) {
                tracing::debug!(key = %claim.key, ?code, "gRPC status not remembered");
                return Outcome::Whole(bytes, trailers);
            }
            // The request body failed while the answer was read (a handler that
            // streams its answer as it takes the upload in): the request never arrived
            // whole, and with no fingerprint the answer would be replayed to any
            // request with this key.
            let Some(fingerprint) = tap.fingerprint() else {
                tracing::debug!(key = %claim.key, "request body failed; not remembered");
                return Outcome::Whole(bytes, trailers);
            };
            // Refused without reading the whole body (a body limit's `413`, decided
            // from `Content-Length` before reading or midway; a parser that failed
            // midway): the body decided the answer, but only the head was
            // fingerprinted, so a corrected repeat under this key would get the stale
            // refusal instead of running. A refusal made nothing happen: not
            // remembered. (Any other answer is, by its head, so that it never runs
            // twice.)
            // So is a trailers-only gRPC error (under `200 OK`: tonic's "message too
            // large" from the length prefix, an interceptor's `INVALID_ARGUMENT`). Not
            // one ending a stream: a client-streaming handler may have acted on the
            // messages it read before it answered. A Connect stream's end-of-stream
            // message alone, with an error, is its trailers-only answer.
            let refused = status.is_client_error()
                || GrpcCode::from_headers(&headers).is_some_and(|c| c != GrpcCode::Ok)
                || connect.is_some_and(|end| end.alone && end.code != GrpcCode::Ok);
            if refused && tap.not_read_whole() {
                tracing::debug!(key = %claim.key, %status, "refused without reading the whole body; not remembered");
                return Outcome::Whole(bytes, trailers);
            }
            let stored = StoredResponse {
                status,
                headers,
                // A copy of its own: kept for the ttl, it must not pin a larger buffer
                // the frame may be a slice of (a connection's read buffer).
                body: Bytes::copy_from_slice(&bytes),
                trailers: trailers.clone(),
                // Of the head alone if the handler did not read the whole request body:
                // repeats are then compared by their heads.
                fingerprint: Some(fingerprint),
            };
            match store
                .complete(&claim.key, claim.token, stored, config.ttl)
                .await
            {
                Ok(()) => claim.armed = false,
                Err(e) => {
                    tracing::warn!(error = %e, key = %claim.key, "could not remember the response")
                }
            }
            Outcome::Whole(bytes, trailers)
        }
    }
}

/// The answer to a request that must carry a key and carries none that is usable: `400`
/// with a problem document (the IETF draft's answer), or `INVALID_ARGUMENT` for gRPC.
#[cold]
fn missing_key<B, F, ResBody, E>(
    req: &Request<B>,
    header: &HeaderName,
) -> ResponseFuture<F, ResBody, E>
where
    ResBody: Send + 'static,
    E: Send + 'static,
{
    let present = req.headers().contains_key(header);
    tracing::debug!(present, "request without a usable idempotency key refused");
    metrics::counter!("postbox_calls_total", "layer" => "idempotency", "outcome" => "key_missing")
        .increment(1);
    let (title, detail) = if present {
        (
            "Idempotency-Key is invalid",
            "This operation requires an Idempotency-Key of visible ASCII characters, not blank.",
        )
    } else {
        (
            "Idempotency-Key is missing",
            "This operation requires an Idempotency-Key header.",
        )
    };
    let res = problem(
        crate::http::grpc_kind(req.headers()),
        StatusCode::BAD_REQUEST,
        title,
        detail,
    );
    ResponseFuture::keyed(Box::pin(std::future::ready(Ok(res))))
}

/// An RFC 9457 problem answer of the layer's own; to a gRPC request (`grpc`), a
/// trailers-only gRPC answer instead (a gRPC client reads a `409` or `422` as
/// `UNKNOWN`, and loses the `Retry-After`): `UNAVAILABLE` for a request to retry
/// later (in progress, with `grpc-retry-pushback-ms`; busy), `INVALID_ARGUMENT` for a
/// key reused by another request, a body that could not be read to compare, or a key
/// missing.
fn problem<B>(
    grpc: Option<crate::http::GrpcKind>,
    status: StatusCode,
    title: &str,
    detail: &str,
) -> Response<BufferedBody<B>> {
    if let Some(kind) = grpc {
        let mut res = Response::new(BufferedBody::full(Bytes::new()));
        let code = match status {
            StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE => 14,
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => 3,
            _ => 2,
        };
        crate::http::grpc_trailers_only(res.headers_mut(), kind, code, detail);
        if matches!(
            status,
            StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE
        ) {
            res.headers_mut().insert(
                HeaderName::from_static("grpc-retry-pushback-ms"),
                HeaderValue::from_static("1000"),
            );
        }
        if status == StatusCode::CONFLICT {
            // A postbox client reads this `UNAVAILABLE` as HTTP's `409`: a refused
            // copy, no failure of this server.
            res.headers_mut().insert(
                HeaderName::from_static(crate::classify::grpc::IN_PROGRESS_HEADER),
                HeaderValue::from_static("1"),
            );
        }
        return res;
    }
    let body = format!(
        r#"{{"title":"{title}","status":{},"detail":"{detail}"}}"#,
        status.as_u16()
    );
    let mut res = Response::new(BufferedBody::full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

fn replayed<B>(stored: StoredResponse) -> Response<BufferedBody<B>> {
    let mut res = Response::new(BufferedBody::full_with_trailers(
        stored.body,
        stored.trailers,
    ));
    *res.status_mut() = stored.status;
    *res.headers_mut() = stored.headers;
    res.headers_mut().insert(
        HeaderName::from_static(REPLAYED_HEADER),
        HeaderValue::from_static("true"),
    );
    res
}

/// Whether a response with `status` and `headers` is stored as the key's outcome: not
/// a `5xx`, nor a "try again later" answer (`408 Request Timeout`, `425 Too Early`,
/// `429 Too Many Requests`), nor a conflict with another request (`409 Conflict`,
/// `423 Locked`), which a later attempt may well turn into a success; replaying them
/// for the whole ttl would make every later attempt fail the same way. Nor an
/// authentication or authorization refusal (`401`, `403`): the request was refused
/// before it ran (as Stripe does not store those), and its retry with a refreshed
/// credential must run. Nor a `1xx` (a `101 Switching Protocols` hands the connection
/// over: replayed without its `Upgrade` header, it would be a bare `101`). Nor a `499`
/// (a client that closed the request, in nginx's use and the Connect protocol's
/// `canceled`). The same for a gRPC status in the headers (a trailers-only response,
/// most gRPC errors). A gRPC request's (`grpc_call`) answer other than `200` without a
/// `grpc-status` is never remembered: its client reads the HTTP status as the code
/// gRPC maps it to (`UNIMPLEMENTED` for a `404`, `INTERNAL`, `UNKNOWN` …), none of
/// which is.
fn remembered(status: http::StatusCode, headers: &http::HeaderMap, grpc_call: bool) -> bool {
    use http::StatusCode;
    if grpc_call && status != StatusCode::OK && GrpcCode::from_headers(headers).is_none() {
        return false;
    }
    !(status.is_server_error()
        || status.is_informational()
        || matches!(
            status,
            StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::REQUEST_TIMEOUT
                | StatusCode::CONFLICT
                | StatusCode::LOCKED
                | StatusCode::TOO_EARLY
                | StatusCode::TOO_MANY_REQUESTS
        )
        || status.as_u16() == 499)
        && GrpcCode::from_headers(headers).is_none_or(remembered_grpc)
}

/// Whether a gRPC call that ended with `code` is stored as the key's outcome: as for
/// HTTP, not the codes of a server-side failure or a "try again" answer (the
/// `5xx`/`408`/`429` of gRPC's HTTP mapping: `CANCELLED`, `UNKNOWN`,
/// `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`, `UNIMPLEMENTED`, `INTERNAL`,
/// `UNAVAILABLE`, `DATA_LOSS`), nor a refused credential (`UNAUTHENTICATED`,
/// `PERMISSION_DENIED`, HTTP's `401`/`403`). `OK` and the caller's own errors
/// (`INVALID_ARGUMENT`, `NOT_FOUND`, `ALREADY_EXISTS`, …) are remembered.
fn remembered_grpc(code: GrpcCode) -> bool {
    use GrpcCode::*;
    matches!(
        code,
        Ok | InvalidArgument | NotFound | AlreadyExists | FailedPrecondition | OutOfRange
    )
}

/// Whether `res` is a server-sent event stream (`text/event-stream`): it never ends
/// while the client listens, so it is streamed through, never remembered (read to its
/// end first, no event would reach the client).
fn is_event_stream<B>(res: &Response<B>) -> bool {
    res.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes()
                .get(..17)
                .is_some_and(|t| t.eq_ignore_ascii_case(b"text/event-stream"))
        })
}

/// The headers of a response to store: without the hop-by-hop ones (RFC 9110 §7.6.1:
/// the fixed ones and those its `connection` header names), which described the first
/// answer's connection, not the answer (a stored `transfer-encoding: chunked` would
/// be replayed over a body sent whole). `trailer` is end to end and kept: hyper sends
/// an HTTP/1.1 answer's trailers only when it names them.
fn end_to_end(headers: &http::HeaderMap) -> http::HeaderMap {
    const HOP_BY_HOP: [&str; 6] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "upgrade",
    ];
    let mut kept = headers.clone();
    for name in HOP_BY_HOP {
        kept.remove(name);
    }
    for name in crate::enqueue::codec::http_codec::tokens(headers, http::header::CONNECTION) {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            kept.remove(name);
        }
    }
    kept
}

/// The `grpc-status` of a binary gRPC-Web answer: see
/// [`web_trailers`](crate::classify::grpc::web_trailers).
fn grpc_web_status(headers: &http::HeaderMap, body: &[u8]) -> Option<GrpcCode> {
    let (_, trailers) = crate::classify::grpc::web_trailers(headers, body)?;
    GrpcCode::from_headers(&trailers)
}

/// How a Connect-protocol stream ended.
#[derive(Debug, Clone, Copy)]
struct ConnectEnd {
    code: GrpcCode,
    /// The end-of-stream message came alone, no message before it (the stream's
    /// trailers-only answer).
    alone: bool,
}

/// The outcome of a Connect-protocol stream (a response of `application/connect+…`):
/// always `200 OK`, it ends with an end-of-stream message (flag `0x02`) whose JSON
/// carries the error, if any (`{"error":{"code":"unavailable",…}}`). A stream without a
/// readable one (cut short, compressed) is `UNKNOWN`, as its client reads it.
fn connect_stream_end(headers: &http::HeaderMap, body: &[u8]) -> Option<ConnectEnd> {
    if !crate::http::is_connect_stream(headers) {
        return None;
    }
    let mut rest = body;
    while let [flags, a, b, c, d, tail @ ..] = rest {
        let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
        let Some((message, after)) = tail.split_at_checked(len) else {
            break;
        };
        if flags & 0x02 != 0 {
            let code = match flags & 0x01 {
                0 => connect_end_code(message),
                _ => GrpcCode::Unknown,
            };
            return Some(ConnectEnd {
                code,
                alone: rest.len() == body.len(),
            });
        }
        rest = after;
    }
    Some(ConnectEnd {
        code: GrpcCode::Unknown,
        alone: rest.len() == body.len(),
    })
}

/// The code of a Connect end-of-stream message: `OK` without an error; the error's
/// code, by its name, with one; `UNKNOWN` for one that cannot be read.
fn connect_end_code(message: &[u8]) -> GrpcCode {
    #[derive(serde::Deserialize)]
    struct EndStream {
        #[serde(default)]
        error: Option<EndError>,
    }
    #[derive(serde::Deserialize)]
    struct EndError {
        #[serde(default)]
        code: Option<String>,
    }
    let Ok(end) = serde_json::from_slice::<EndStream>(message) else {
        return GrpcCode::Unknown;
    };
    let Some(error) = end.error else {
        return GrpcCode::Ok;
    };
    match error.code.as_deref().unwrap_or("unknown") {
        "canceled" => GrpcCode::Cancelled,
        "invalid_argument" => GrpcCode::InvalidArgument,
        "deadline_exceeded" => GrpcCode::DeadlineExceeded,
        "not_found" => GrpcCode::NotFound,
        "already_exists" => GrpcCode::AlreadyExists,
        "permission_denied" => GrpcCode::PermissionDenied,
        "resource_exhausted" => GrpcCode::ResourceExhausted,
        "failed_precondition" => GrpcCode::FailedPrecondition,
        "aborted" => GrpcCode::Aborted,
        "out_of_range" => GrpcCode::OutOfRange,
        "unimplemented" => GrpcCode::Unimplemented,
        "internal" => GrpcCode::Internal,
        "unavailable" => GrpcCode::Unavailable,
        "data_loss" => GrpcCode::DataLoss,
        "unauthenticated" => GrpcCode::Unauthenticated,
        _ => GrpcCode::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::Host;
    use http::{Request, StatusCode};

    /// Both "come back later" answers tell a gRPC client when: the `409` of a key in
    /// progress and the `503` of a service not ready before the claim ended.
    #[test]
    fn later_answers_carry_a_pushback_for_grpc() {
        for status in [StatusCode::CONFLICT, StatusCode::SERVICE_UNAVAILABLE] {
            let res =
                super::problem::<bytes::Bytes>(Some(crate::http::GrpcKind::Grpc), status, "t", "d");
            assert_eq!(res.headers()["grpc-retry-pushback-ms"], "1000", "{status}");
            assert_eq!(res.headers()["grpc-status"], "14", "{status}");
        }
    }

    /// The `UNAVAILABLE` answered to a key in progress is, to a postbox client, what
    /// the `409` is over HTTP: a refused copy to retry after the pushback, no failure
    /// of the server (a client retrying after its attempt timeout, while the first
    /// attempt still ran here, counted each refused copy against this server). The
    /// `UNAVAILABLE` of a busy service stays a failure.
    #[test]
    fn a_grpc_answer_in_progress_is_no_failure_of_the_server() {
        use crate::classify::{Class, GrpcClassifier};
        let classify = |status| {
            let res =
                super::problem::<bytes::Bytes>(Some(crate::http::GrpcKind::Grpc), status, "t", "d");
            GrpcClassifier::new()
                .classify_headers(http::StatusCode::OK, res.headers())
                .unwrap()
        };
        let in_progress = classify(StatusCode::CONFLICT);
        assert_eq!(in_progress.class(), Class::Ignored);
        assert!(in_progress.is_retryable());
        assert_eq!(
            in_progress.retry_after(),
            Some(std::time::Duration::from_secs(1))
        );
        let busy = classify(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.class(), Class::Failure);
        assert!(busy.is_retryable());
    }

    fn host(uri: &str, host_header: Option<&str>) -> String {
        let mut req = Request::builder().uri(uri);
        if let Some(h) = host_header {
            req = req.header(http::header::HOST, h);
        }
        Host(&req.body(()).unwrap()).to_string()
    }

    #[test]
    fn the_scoped_host_leaves_out_userinfo_and_case() {
        assert_eq!(host("http://u:pw@Shop.Test:8080/o", None), "shop.test:8080");
        assert_eq!(host("http://Shop.Test/o", Some("other.test")), "shop.test");
        assert_eq!(host("/o", Some("Shop.Test")), "shop.test");
        assert_eq!(host("/o", None), "");
    }

    /// A gRPC-Web frame: `flags`, the length, the payload.
    fn frame(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![flags];
        f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_grpc_web_status_is_read_from_the_trailers_frame() {
        use super::{GrpcCode, grpc_web_status};
        let web = |ct: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            h
        };
        let mut body = frame(0, b"\x0a\x04pong");
        body.extend(frame(0x80, b"grpc-message: fine\r\nGrpc-Status: 14\r\n"));
        let h = web("application/grpc-web+proto");
        assert_eq!(grpc_web_status(&h, &body), Some(GrpcCode::Unavailable));
        let ok = frame(0x80, b"grpc-status:0\r\n");
        assert_eq!(grpc_web_status(&h, &ok), Some(GrpcCode::Ok));
        assert_eq!(
            grpc_web_status(&web("application/grpc-web"), &ok),
            Some(GrpcCode::Ok)
        );
        // No trailers frame, no status in it, a cut frame: no status.
        assert_eq!(grpc_web_status(&h, &frame(0, b"pong")), None);
        assert_eq!(grpc_web_status(&h, &frame(0x80, b"x-other: 1\r\n")), None);
        assert_eq!(grpc_web_status(&h, &ok[..ok.len() - 3]), None);
        // Not gRPC-Web, or its base64 text form: not read.
        assert_eq!(grpc_web_status(&web("application/grpc"), &ok), None);
        let upper = web("Application/gRPC-Web; charset=utf-8");
        assert_eq!(grpc_web_status(&upper, &ok), Some(GrpcCode::Ok));
        assert_eq!(grpc_web_status(&web("application/grpc-webx"), &ok), None);
        assert_eq!(
            grpc_web_status(&web("application/grpc-web-text+proto"), &ok),
            None
        );
        assert_eq!(
            grpc_web_status(&web("application/grpc-web-text"), &ok),
            None
        );
        assert_eq!(grpc_web_status(&http::HeaderMap::new(), &ok), None);
    }
}
