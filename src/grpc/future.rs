//! Response future of [`GrpcStatus`](super::GrpcStatus).

use super::body::{GrpcStatusBody, Report, WebScan, error_outcome};
use super::{GrpcOutcome, OnGrpcStatus};
use crate::BoxError;
use crate::classify::GrpcClassifier;
use crate::classify::grpc::GrpcCode;
use bytes::{Buf, Bytes, BytesMut};
use http::response::Parts;
use http::{HeaderMap, HeaderValue, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

pin_project! {
    /// Response future of [`GrpcStatus`](super::GrpcStatus): waits for the response,
    /// then reads its body (up to the limit) to learn the final status.
    ///
    /// # Cancel safety
    /// Dropping it drops the call in flight or the partly read body; nothing is
    /// reported.
    pub struct ResponseFuture<F, B, H> {
        #[pin]
        state: State<F, B>,
        // `None`: a method named `stream_through`, returned at once.
        limit: Option<usize>,
        // `Some(true)`: the request was not a gRPC call (a REST route, a Connect call,
        // behind the same stack), its answer is passed on untouched. `None`: it had no
        // content type, and its answer tells.
        passthrough: Option<bool>,
        classifier: GrpcClassifier,
        hook: Arc<H>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B> {
        Calling { #[pin] fut: F },
        Reading {
            parts: Option<Parts>,
            // `Option` so it can move into the response; `B: Unpin` (tonic's and
            // hyper's bodies are).
            body: Option<B>,
            data: Collected,
        },
        Done,
    }
}

/// The data read so far: one chunk kept as is, copied only when a second arrives.
#[derive(Default)]
struct Collected {
    first: Option<Bytes>,
    more: Option<BytesMut>,
    len: usize,
}

impl Collected {
    fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        if chunk.is_empty() {
            return;
        }
        if let Some(more) = &mut self.more {
            more.extend_from_slice(&chunk);
        } else if let Some(first) = self.first.take() {
            let mut more = BytesMut::with_capacity(first.len() + chunk.len());
            more.extend_from_slice(&first);
            more.extend_from_slice(&chunk);
            self.more = Some(more);
        } else {
            self.first = Some(chunk);
        }
    }

    fn take(&mut self) -> Bytes {
        self.len = 0;
        match (self.more.take(), self.first.take()) {
            (Some(more), _) => more.freeze(),
            (None, Some(first)) => first,
            (None, None) => Bytes::new(),
        }
    }
}

impl<F, B, H> ResponseFuture<F, B, H> {
    pub(crate) fn new(
        fut: F,
        limit: Option<usize>,
        passthrough: Option<bool>,
        classifier: GrpcClassifier,
        hook: Arc<H>,
    ) -> Self {
        Self {
            state: State::Calling { fut },
            limit,
            passthrough,
            classifier,
            hook,
        }
    }
}

impl<F, B, H> fmt::Debug for ResponseFuture<F, B, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Calling { .. } => "calling",
            State::Reading { .. } => "reading",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("limit", &self.limit)
            .finish()
    }
}

impl<F, B, E, H> Future for ResponseFuture<F, B, H>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
    H: OnGrpcStatus,
{
    type Output = Result<Response<GrpcStatusBody<B, H>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let (mut parts, body) = res.into_parts();
                    // Not a gRPC call (a REST route or a Connect call behind the same
                    // stack): its answer is passed on untouched, not read for a status it
                    // cannot have. (A gRPC call answered with a `200` page is `UNKNOWN`,
                    // below, as the gRPC spec says.) A request without a content type
                    // (a `GET`, a `DELETE`, a Connect `GET`) is no gRPC client's, which
                    // always sends one: its answer is read only when it is a gRPC
                    // server's (a `grpc-status`, gRPC's content type), not when it has
                    // no content type (a `204`, an empty `200`).
                    let passthrough = this.passthrough.unwrap_or_else(|| {
                        !parts.headers.contains_key("grpc-status")
                            && !crate::http::is_grpc(&parts.headers)
                    });
                    if passthrough {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(Response::from_parts(
                            parts,
                            GrpcStatusBody::streaming(Bytes::new(), body, None),
                        )));
                    }
                    if let Some(c) = this
                        .classifier
                        .classify_headers(parts.status, &parts.headers)
                    {
                        // Trailers-only (or a non-200 from a proxy): the status is final.
                        let sent = GrpcCode::from_headers(&parts.headers);
                        let code = sent.unwrap_or_else(|| GrpcCode::from_http_status(parts.status));
                        let outcome = GrpcOutcome::new(code, c, false);
                        this.hook.on_grpc_status(&outcome);
                        parts.extensions.insert(outcome);
                        this.state.set(State::Done);
                        if sent.is_none() {
                            // A proxy's page (a `502` from nginx, a `503` from a load
                            // balancer): the status the gRPC spec has the client make
                            // of it goes into the headers, and the page is dropped. Left
                            // as it was, tonic read the page as gRPC frames, and its
                            // caller got `INTERNAL` ("invalid compression flag") where
                            // these layers had seen `UNAVAILABLE`.
                            proxy_status(&mut parts, code);
                            return Poll::Ready(Ok(Response::from_parts(
                                parts,
                                GrpcStatusBody::empty(),
                            )));
                        }
                        return Poll::Ready(Ok(Response::from_parts(
                            parts,
                            GrpcStatusBody::streaming(Bytes::new(), body, None),
                        )));
                    }
                    if this.limit.is_none() {
                        // A streaming method: stream it all, report at its end.
                        let report = Report {
                            classifier: *this.classifier,
                            hook: this.hook.clone(),
                            web: WebScan::for_response(&parts.headers),
                        };
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(Response::from_parts(
                            parts,
                            GrpcStatusBody::streaming(Bytes::new(), body, Some(report)),
                        )));
                    }
                    this.state.set(State::Reading {
                        parts: Some(parts),
                        body: Some(body),
                        data: Collected::default(),
                    });
                }
                StateProj::Reading { parts, body, data } => {
                    let inner = body.as_mut().expect("body taken once");
                    let frame = match ready!(Pin::new(inner).poll_frame(cx)) {
                        Some(Ok(frame)) => frame,
                        Some(Err(e)) => {
                            // Reported like every other response ("every response").
                            let e: BoxError = e.into();
                            this.hook
                                .on_grpc_status(&error_outcome(&e, this.classifier, false));
                            this.state.set(State::Done);
                            return Poll::Ready(Err(e));
                        }
                        None => {
                            let parts = parts.take().expect("parts taken once");
                            let data = data.take();
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(finish(
                                parts,
                                data,
                                None,
                                this.classifier,
                                &**this.hook,
                            )));
                        }
                    };
                    match frame.into_data() {
                        Ok(mut chunk) => {
                            let chunk = chunk.copy_to_bytes(chunk.remaining());
                            if data.len + chunk.len() > this.limit.unwrap_or(0) {
                                // Too long to buffer: stream the rest, report at its end.
                                data.push(chunk);
                                let prefix = data.take();
                                let parts = parts.take().expect("parts taken once");
                                let report = Report {
                                    classifier: *this.classifier,
                                    hook: this.hook.clone(),
                                    web: WebScan::for_response(&parts.headers),
                                };
                                let body = body.take().expect("body taken once");
                                this.state.set(State::Done);
                                return Poll::Ready(Ok(Response::from_parts(
                                    parts,
                                    GrpcStatusBody::streaming(prefix, body, Some(report)),
                                )));
                            }
                            data.push(chunk);
                        }
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                let parts = parts.take().expect("parts taken once");
                                let data = data.take();
                                this.state.set(State::Done);
                                return Poll::Ready(Ok(finish(
                                    parts,
                                    data,
                                    Some(trailers),
                                    this.classifier,
                                    &**this.hook,
                                )));
                            }
                            // An unknown frame kind: skip it.
                        }
                    }
                }
                StateProj::Done => panic!("grpc status future polled after completion"),
            }
        }
    }
}

/// Builds the response for a body read in full: a non-OK (or missing) status is
/// promoted into the headers, the trailers-only form; an OK one keeps its body and
/// trailers.
fn finish<B, H: OnGrpcStatus>(
    mut parts: Parts,
    data: Bytes,
    trailers: Option<HeaderMap>,
    classifier: &GrpcClassifier,
    hook: &H,
) -> Response<GrpcStatusBody<B, H>> {
    // gRPC-Web carries its trailers in the body, as a last frame: read from there (a
    // base64 body decoded first), and the body left as it is unless the status is
    // promoted into the headers (its trailers-only form), as for gRPC. Before, it looked
    // like an answer without a status: every one became `UNKNOWN`, its body emptied.
    // Unless its status came as HTTP trailers: tonic-web's client layer inside turns the
    // trailers frame into them, and leaves the content type. (That status was dropped,
    // and every such answer read `UNKNOWN`.)
    let code = trailers.as_ref().and_then(GrpcCode::from_headers);
    if code.is_none()
        && let Some(kind @ (crate::http::GrpcKind::Web | crate::http::GrpcKind::WebText)) =
            crate::http::grpc_kind(&parts.headers)
    {
        let text = kind == crate::http::GrpcKind::WebText;
        let frames = if text {
            Bytes::from(crate::classify::grpc::web_text_decode(&data).unwrap_or_default())
        } else {
            data.clone()
        };
        return finish_web(parts, data, frames, text, classifier, hook);
    }
    let outcome = GrpcOutcome::new(
        code.unwrap_or(GrpcCode::Unknown),
        classifier.classify_trailers(trailers.as_ref()),
        false,
    );
    hook.on_grpc_status(&outcome);
    parts.extensions.insert(outcome);
    // Two messages or more: a server stream not named `stream_through`. tonic stops at
    // a status in the headers, so promoting it would drop the messages the caller was
    // sent: they are kept, with the status in the trailers (the outcome still goes to
    // the hook and the extensions; layers reading the headers see a success). A unary
    // answer has at most one message, which tonic ignores under a non-OK status.
    if code == Some(GrpcCode::Ok) {
        return Response::from_parts(parts, GrpcStatusBody::buffered(data, trailers));
    }
    if messages(&data) > 1 {
        let trailers = if code.is_some() {
            trailers
        } else {
            // The stand-in `UNKNOWN` goes where the missing status would have been.
            let mut t = trailers.unwrap_or_default();
            stand_in_unknown(&mut t);
            Some(t)
        };
        return Response::from_parts(parts, GrpcStatusBody::buffered(data, trailers));
    }
    match trailers {
        Some(trailers) if code.is_some() => {
            for (name, value) in &trailers {
                parts.headers.append(name, value.clone());
            }
        }
        other => {
            // Trailers without a status still carry the server's metadata: kept, under
            // the `UNKNOWN` status that stands in for the missing one.
            for (name, value) in other.iter().flatten() {
                parts.headers.append(name, value.clone());
            }
            stand_in_unknown(&mut parts.headers);
        }
    }
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, GrpcStatusBody::empty())
}

/// [`finish`] for a gRPC-Web answer: `data` is its body as it came, `frames` the same
/// as gRPC-Web frames (decoded from base64 for `-text`), its status in the trailers frame
/// that ends them (`text`: `data` is base64). A non-OK or missing status of an answer
/// with at most one message is promoted into the headers and the body dropped, as for
/// gRPC; otherwise the body goes on as it is (its trailers in it), with a stand-in
/// `UNKNOWN` trailers frame if it had no status.
fn finish_web<B, H: OnGrpcStatus>(
    mut parts: Parts,
    data: Bytes,
    frames: Bytes,
    text: bool,
    classifier: &GrpcClassifier,
    hook: &H,
) -> Response<GrpcStatusBody<B, H>> {
    let (messages_end, trailers) = crate::classify::grpc::frames_trailers(&frames)
        .map_or((frames.len(), None), |(end, t)| (end, Some(t)));
    let code = trailers.as_ref().and_then(GrpcCode::from_headers);
    let outcome = GrpcOutcome::new(
        code.unwrap_or(GrpcCode::Unknown),
        classifier.classify_trailers(trailers.as_ref()),
        false,
    );
    hook.on_grpc_status(&outcome);
    parts.extensions.insert(outcome);
    let many = messages(&frames[..messages_end]) > 1;
    if code == Some(GrpcCode::Ok) || (code.is_some() && many) {
        return Response::from_parts(parts, GrpcStatusBody::buffered(data, None));
    }
    if many {
        // Kept, as for gRPC, with the stand-in `UNKNOWN` in a trailers frame of its
        // own (the body's, if it had one without a status): sent on as it came, the
        // caller read a clean end.
        let mut t = trailers.unwrap_or_default();
        stand_in_unknown(&mut t);
        let mut body = frames[..messages_end].to_vec();
        let mut lines = Vec::new();
        for (name, value) in &t {
            lines.extend_from_slice(name.as_str().as_bytes());
            lines.push(b':');
            lines.extend_from_slice(value.as_bytes());
            lines.extend_from_slice(b"\r\n");
        }
        body.push(0x80);
        body.extend_from_slice(&u32::try_from(lines.len()).unwrap_or(u32::MAX).to_be_bytes());
        body.extend_from_slice(&lines);
        let body = if text {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .encode(&body)
                .into_bytes()
        } else {
            body
        };
        parts.headers.remove(http::header::CONTENT_LENGTH);
        return Response::from_parts(parts, GrpcStatusBody::buffered(Bytes::from(body), None));
    }
    for (name, value) in trailers.iter().flatten() {
        // Bounded (`MAX_WEB_TRAILER_FIELDS`), and never a panic on a full map.
        if parts.headers.try_append(name, value.clone()).is_err() {
            break;
        }
    }
    if code.is_none() {
        stand_in_unknown(&mut parts.headers);
    }
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, GrpcStatusBody::empty())
}

/// Makes a non-200 answer without a `grpc-status` (a proxy's) trailers-only, with
/// `code` (from its HTTP status, as the gRPC spec maps it) and a `grpc-message` naming
/// that status; its body is dropped.
fn proxy_status(parts: &mut Parts, code: GrpcCode) {
    parts
        .headers
        .insert("grpc-status", HeaderValue::from(code as i32));
    let message = format!("HTTP%20{}%20from%20a%20proxy", parts.status.as_u16());
    if let Ok(message) = HeaderValue::from_str(&message) {
        parts.headers.insert("grpc-message", message);
    }
    parts.headers.remove(http::header::CONTENT_LENGTH);
}

/// Sets the `UNKNOWN` status that stands in for a missing one.
fn stand_in_unknown(map: &mut HeaderMap) {
    map.insert("grpc-status", HeaderValue::from_static("2"));
    map.insert(
        "grpc-message",
        HeaderValue::from_static("missing%20grpc-status"),
    );
}

/// How many whole length-prefixed gRPC messages `data` holds (a flag byte and a 32-bit
/// big-endian length before each), counting no further than two.
fn messages(data: &[u8]) -> usize {
    let mut at = 0usize;
    let mut n = 0;
    while n < 2 && data.len().saturating_sub(at) >= 5 {
        let len = u32::from_be_bytes([data[at + 1], data[at + 2], data[at + 3], data[at + 4]]);
        let Some(end) = (at + 5)
            .checked_add(len as usize)
            .filter(|&e| e <= data.len())
        else {
            break;
        };
        at = end;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Classify;
    use crate::grpc::GrpcStatusLayer;
    use http_body_util::{BodyExt, Full};
    use tower::{Layer, ServiceExt, service_fn};

    fn trailers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    /// Calls `/echo.Echo/Say` through a `GrpcStatus` whose inner service answers
    /// `data` then `trailers`.
    async fn call(
        layer: GrpcStatusLayer,
        data: &'static [u8],
        trailers: Option<HeaderMap>,
    ) -> (http::response::Parts, Bytes, Option<HeaderMap>, bool) {
        let svc = layer.layer(service_fn(move |_: http::Request<()>| {
            let trailers = trailers.clone();
            async move {
                let body = Full::new(Bytes::from_static(data))
                    .map_err(|e| -> BoxError { match e {} })
                    .with_trailers(std::future::ready(trailers.map(Ok)));
                Ok::<_, BoxError>(Response::new(body))
            }
        }));
        let req = http::Request::post("http://a/echo.Echo/Say")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(())
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let buffered = body.is_buffered();
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (parts, collected.to_bytes(), trailers, buffered)
    }

    /// Calls through a `GrpcStatus` whose inner service answers `data` as `content_type`
    /// (gRPC-Web: its trailers are a frame of the body).
    async fn call_web(content_type: &'static str, data: Vec<u8>) -> (http::response::Parts, Bytes) {
        call_web_through(GrpcStatusLayer::new(), content_type, data).await
    }

    /// [`call_web`] through `layer`.
    async fn call_web_through(
        layer: GrpcStatusLayer,
        content_type: &'static str,
        data: Vec<u8>,
    ) -> (http::response::Parts, Bytes) {
        let svc = layer.layer(service_fn(move |_: http::Request<()>| {
            let data = data.clone();
            async move {
                let mut res = Response::new(Full::new(Bytes::from(data)));
                res.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static(content_type),
                );
                Ok::<_, BoxError>(res)
            }
        }));
        let req = http::Request::post("http://a/echo.Echo/Say")
            .header(http::header::CONTENT_TYPE, content_type)
            .body(())
            .unwrap();
        let (parts, body) = svc.oneshot(req).await.unwrap().into_parts();
        (parts, body.collect().await.unwrap().to_bytes())
    }

    /// A bodiless request as a gRPC client sends it: with gRPC's content type.
    fn grpc_request() -> http::Request<()> {
        http::Request::post("http://a/echo.Echo/Say")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(())
            .unwrap()
    }

    fn web_frame(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![flags];
        f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// gRPC-Web carries its status in a trailers frame of the body: read from there. A
    /// non-OK one of an answer with at most one message moves into the headers (its
    /// trailers-only form); an OK answer goes on as it is. (Every gRPC-Web answer looked
    /// like one without a status: `UNKNOWN`, its body emptied.)
    #[tokio::test]
    async fn a_grpc_web_status_is_read_from_its_trailers_frame() {
        const WEB: &str = "application/grpc-web+proto";
        let not_found = web_frame(0x80, b"grpc-status: 5\r\ngrpc-message: no order\r\n");
        let (parts, data) = call_web(WEB, not_found).await;
        assert_eq!(parts.headers["grpc-status"], "5");
        assert_eq!(parts.headers["grpc-message"], "no order");
        assert!(data.is_empty());
        let outcome = parts.extensions.get::<GrpcOutcome>().unwrap();
        assert_eq!(outcome.code(), GrpcCode::NotFound);

        let mut ok = web_frame(0, b"pong");
        ok.extend(web_frame(0x80, b"grpc-status: 0\r\n"));
        let (parts, data) = call_web(WEB, ok.clone()).await;
        assert!(parts.headers.get("grpc-status").is_none());
        assert_eq!(&data[..], &ok[..], "the body goes on as it was");
        let outcome = parts.extensions.get::<GrpcOutcome>().unwrap();
        assert_eq!(outcome.code(), GrpcCode::Ok);
        assert!(!outcome.classification().is_failure());

        // Base64: no trailers frame, an answer without a status: `UNKNOWN`, as for gRPC.
        let (parts, data) = call_web("application/grpc-web-text", b"AAAAAARwb25n".to_vec()).await;
        assert_eq!(parts.headers["grpc-status"], "2");
        assert!(data.is_empty());
        let outcome = parts.extensions.get::<GrpcOutcome>().unwrap();
        assert_eq!(outcome.code(), GrpcCode::Unknown);
    }

    /// A gRPC-Web answer without a status (no trailers frame, or one without
    /// `grpc-status`) is `UNKNOWN` in the headers, as a gRPC one is, its metadata kept:
    /// the layers above read a failure. (It went on as it came: the hook was told
    /// `UNKNOWN`, the retry and the breaker read a success.) One with two messages keeps
    /// them.
    #[tokio::test]
    async fn a_grpc_web_answer_without_a_status_is_unknown_in_the_headers() {
        const WEB: &str = "application/grpc-web+proto";
        for body in [
            web_frame(0, b"pong"),
            [web_frame(0, b"pong"), web_frame(0x80, b"x-trace: 1\r\n")].concat(),
        ] {
            let (parts, data) = call_web(WEB, body.clone()).await;
            assert_eq!(parts.headers["grpc-status"], "2", "{body:?}");
            assert!(data.is_empty());
            let outcome = parts.extensions.get::<GrpcOutcome>().unwrap();
            assert_eq!(outcome.code(), GrpcCode::Unknown);
            let c = Classify::<_, BoxError>::classify(
                &GrpcClassifier::new(),
                Ok(&Response::from_parts(parts, ())),
            );
            assert!(c.is_failure());
        }
        let (parts, _) = call_web(
            WEB,
            [web_frame(0, b"pong"), web_frame(0x80, b"x-trace: 1\r\n")].concat(),
        )
        .await;
        assert_eq!(parts.headers["x-trace"], "1");
        let two = [web_frame(0, b"a"), web_frame(0, b"b")].concat();
        let (parts, data) = call_web(WEB, two.clone()).await;
        assert!(parts.headers.get("grpc-status").is_none());
        assert!(data.starts_with(&two), "the messages are kept");
    }

    /// A gRPC-Web answer whose status came as HTTP trailers (tonic-web's client layer
    /// inside turns the trailers frame into them and keeps the content type) is read
    /// by those trailers, as a gRPC one: an OK answer keeps its message and trailers, a
    /// non-OK one is promoted. (The trailers were dropped and every such answer read
    /// `UNKNOWN`, its message emptied.)
    #[tokio::test]
    async fn a_grpc_web_answer_with_its_status_in_http_trailers_is_read_by_them() {
        for (code, expected) in [("0", GrpcCode::Ok), ("14", GrpcCode::Unavailable)] {
            let svc = GrpcStatusLayer::new().layer(service_fn(move |_: http::Request<()>| {
                let t = trailers(&[("grpc-status", code), ("x-trace", "1")]);
                async move {
                    let body = Full::new(Bytes::from(web_frame(0, b"pong")))
                        .map_err(|e| -> BoxError { match e {} })
                        .with_trailers(std::future::ready(Some(Ok(t))));
                    let mut res = Response::new(body);
                    res.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/grpc-web+proto"),
                    );
                    Ok::<_, BoxError>(res)
                }
            }));
            let res = svc.oneshot(grpc_request()).await.unwrap();
            let (parts, body) = res.into_parts();
            let outcome = parts.extensions.get::<GrpcOutcome>().unwrap();
            assert_eq!(outcome.code(), expected);
            let collected = body.collect().await.unwrap();
            if expected == GrpcCode::Ok {
                assert!(parts.headers.get("grpc-status").is_none());
                assert_eq!(collected.trailers().unwrap()["x-trace"], "1");
                assert_eq!(&collected.to_bytes()[..], &web_frame(0, b"pong")[..]);
            } else {
                assert_eq!(parts.headers["grpc-status"], code);
                assert_eq!(parts.headers["x-trace"], "1");
            }
        }
    }

    /// A proxy's non-200 page to a gRPC call (no `grpc-status`) is made the status the
    /// gRPC spec maps its HTTP status to, in the headers, and the page is dropped, so
    /// the caller reads what these layers classified. (tonic read the page as gRPC
    /// frames: `INTERNAL`, "invalid compression flag", where the breaker and the retry
    /// had seen `UNAVAILABLE`.) A non-200 with its own `grpc-status` keeps it.
    #[tokio::test]
    async fn a_proxys_error_page_is_the_status_the_spec_maps_it_to() {
        for (status, grpc_status, expected) in [
            (502, None, GrpcCode::Unavailable),
            (404, None, GrpcCode::Unimplemented),
            (503, Some("8"), GrpcCode::ResourceExhausted),
        ] {
            let svc =
                GrpcStatusLayer::new().layer(service_fn(move |_: http::Request<()>| async move {
                    let mut res =
                        Response::new(Full::new(Bytes::from_static(b"<html>Bad Gateway</html>")));
                    *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    let h = res.headers_mut();
                    h.insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("text/html"),
                    );
                    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("24"));
                    if let Some(g) = grpc_status {
                        h.insert("grpc-status", HeaderValue::from_static(g));
                    }
                    Ok::<_, BoxError>(res)
                }));
            let res = svc.oneshot(grpc_request()).await.unwrap();
            let (parts, body) = res.into_parts();
            assert_eq!(
                parts.extensions.get::<GrpcOutcome>().unwrap().code(),
                expected
            );
            let status =
                tonic::Status::from_header_map(&parts.headers).expect("a status in the headers");
            assert_eq!(status.code() as i32, expected as i32, "{status:?}");
            if grpc_status.is_none() {
                assert!(
                    status.message().contains(&status_text(parts.status)),
                    "{status:?}"
                );
                assert!(parts.headers.get(http::header::CONTENT_LENGTH).is_none());
                assert!(body.collect().await.unwrap().to_bytes().is_empty());
            }
        }
    }

    fn status_text(s: http::StatusCode) -> String {
        s.as_u16().to_string()
    }

    /// A gRPC-Web answer of two messages or more without a status keeps its messages
    /// and ends with a stand-in `UNKNOWN` trailers frame (with the metadata of the one it
    /// had), as a gRPC one ends with `UNKNOWN` trailers; in base64 too. (It went on as it
    /// came: the caller read a clean end.)
    #[tokio::test]
    async fn a_grpc_web_stream_without_a_status_ends_in_a_stand_in_unknown() {
        use base64::Engine as _;
        let two = [web_frame(0, b"a"), web_frame(0, b"b")].concat();
        let with_meta = [two.clone(), web_frame(0x80, b"x-trace: 1\r\n")].concat();
        for (body, meta) in [(two.clone(), false), (with_meta, true)] {
            for text in [false, true] {
                let (content_type, sent) = if text {
                    let b64 = base64::engine::general_purpose::STANDARD.encode(&body);
                    ("application/grpc-web-text", b64.into_bytes())
                } else {
                    ("application/grpc-web+proto", body.clone())
                };
                let (parts, data) = call_web(content_type, sent).await;
                assert!(parts.headers.get("grpc-status").is_none());
                assert_eq!(
                    parts.extensions.get::<GrpcOutcome>().unwrap().code(),
                    GrpcCode::Unknown
                );
                let frames = if text {
                    crate::classify::grpc::web_text_decode(&data).unwrap()
                } else {
                    data.to_vec()
                };
                assert_eq!(&frames[..two.len()], &two[..], "the messages are kept");
                let (end, t) = crate::classify::grpc::frames_trailers(&frames).unwrap();
                assert_eq!(end, two.len());
                assert_eq!(t["grpc-status"], "2");
                assert_eq!(t.get("x-trace").is_some(), meta);
            }
        }
    }

    /// A gRPC-Web trailers frame of more distinct names than a `HeaderMap` holds (a
    /// hostile upstream, under a raised limit) is read up to a bound, not a panic: its
    /// status, read first, still decides.
    #[tokio::test]
    async fn a_grpc_web_trailers_frame_of_too_many_names_is_read_up_to_a_bound() {
        let mut lines = b"grpc-status: 14\r\n".to_vec();
        for i in 0..30_000 {
            lines.extend_from_slice(format!("x{i}: 1\r\n").as_bytes());
        }
        let body = [web_frame(0, b"pong"), web_frame(0x80, &lines)].concat();
        let layer = GrpcStatusLayer::new().with_limit(1 << 20);
        let (parts, _) = call_web_through(layer, "application/grpc-web+proto", body).await;
        assert_eq!(parts.headers["grpc-status"], "14");
        assert!(parts.headers.len() <= 1100, "{}", parts.headers.len());
    }

    /// gRPC-Web-text (base64, often sent as one padded chunk per frame): its status is
    /// read from the decoded trailers frame and reported; an OK answer goes on unchanged,
    /// a non-OK one is promoted into the headers as a binary one is. (Every such answer,
    /// an OK one too, was reported `UNKNOWN`, a failure; then a non-OK one went on as it
    /// came, read as a success by the layers above.)
    #[tokio::test]
    async fn a_grpc_web_text_status_is_read_from_its_decoded_trailers_frame() {
        use base64::Engine as _;
        const TEXT: &str = "application/grpc-web-text+proto";
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        for (status, code, failure) in [
            ("0", GrpcCode::Ok, false),
            ("14", GrpcCode::Unavailable, true),
        ] {
            let trailers = format!("grpc-status: {status}\r\n");
            // One chunk per frame, each padded (a 10-byte frame ends in `==`), as
            // grpc-web servers write them.
            let chunked =
                b64(&web_frame(0, b"hello")) + &b64(&web_frame(0x80, trailers.as_bytes()));
            let mut whole = web_frame(0, b"hello");
            whole.extend(web_frame(0x80, trailers.as_bytes()));
            for body in [chunked, b64(&whole)] {
                let (parts, data) = call_web(TEXT, body.clone().into_bytes()).await;
                if failure {
                    assert_eq!(parts.headers["grpc-status"], status, "{body}");
                    assert!(data.is_empty(), "trailers-only form");
                } else {
                    assert!(parts.headers.get("grpc-status").is_none());
                    assert_eq!(&data[..], body.as_bytes(), "the body goes on as it was");
                }
                let outcome = parts.extensions.get::<GrpcOutcome>().unwrap();
                assert_eq!(outcome.code(), code, "{body}");
                assert_eq!(outcome.classification().is_failure(), failure);
            }
        }
    }

    #[tokio::test]
    async fn a_non_ok_status_in_the_trailers_moves_into_the_headers() {
        let t = trailers(&[
            ("grpc-status", "14"),
            ("grpc-message", "down"),
            ("grpc-retry-pushback-ms", "20"),
        ]);
        let (parts, data, trailers, _) = call(GrpcStatusLayer::new(), b"msg", Some(t)).await;
        assert_eq!(parts.headers["grpc-status"], "14");
        assert_eq!(parts.headers["grpc-message"], "down");
        assert_eq!(parts.headers["grpc-retry-pushback-ms"], "20");
        assert!(data.is_empty() && trailers.is_none(), "trailers-only form");
        let outcome = parts.extensions.get::<GrpcOutcome>().unwrap();
        assert_eq!(outcome.code(), GrpcCode::Unavailable);
        assert_eq!(
            outcome.classification().retry_after(),
            Some(std::time::Duration::from_millis(20))
        );
    }

    /// A server stream not named `stream_through` that sent messages before its error
    /// keeps them (tonic would stop at a status in the headers and drop them), with the
    /// status in the trailers and the outcome still reported.
    #[tokio::test]
    async fn a_stream_that_sent_messages_before_its_error_keeps_them() {
        const TWO: &[u8] = b"\0\0\0\0\x01a\0\0\0\0\x01b";
        let t = trailers(&[("grpc-status", "14")]);
        let (parts, data, kept, _) = call(GrpcStatusLayer::new(), TWO, Some(t)).await;
        assert!(parts.headers.get("grpc-status").is_none(), "promoted");
        assert_eq!(&data[..], TWO);
        assert_eq!(kept.unwrap()["grpc-status"], "14");
        let outcome = parts.extensions.get::<GrpcOutcome>().unwrap();
        assert_eq!(outcome.code(), GrpcCode::Unavailable);
        // Without a status at all: kept too, the stand-in `UNKNOWN` in the trailers.
        let (parts, data, kept, _) = call(GrpcStatusLayer::new(), TWO, None).await;
        assert!(parts.headers.get("grpc-status").is_none(), "promoted");
        assert_eq!(&data[..], TWO);
        assert_eq!(kept.unwrap()["grpc-status"], "2");
        // One message is a unary answer's: promoted as before.
        let t = trailers(&[("grpc-status", "14")]);
        let (parts, data, _, _) = call(GrpcStatusLayer::new(), &TWO[..6], Some(t)).await;
        assert_eq!(parts.headers["grpc-status"], "14");
        assert!(data.is_empty());
    }

    #[test]
    fn messages_counts_whole_length_prefixed_frames() {
        assert_eq!(messages(b""), 0);
        assert_eq!(messages(b"msg"), 0);
        assert_eq!(messages(b"\0\0\0\0\x01a"), 1);
        assert_eq!(messages(b"\0\0\0\0\x01a\0\0\0\0\x05ab"), 1, "a cut frame");
        assert_eq!(messages(b"\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"), 2);
        assert_eq!(messages(b"\0\xff\xff\xff\xff"), 0);
    }

    /// The answer to a request that is not a gRPC call (a REST route behind the same
    /// stack: its content type is another) is passed on untouched: it was read, given
    /// `grpc-status: 2` and emptied, its JSON lost. A gRPC call answered with such a
    /// `200` (a proxy's page) is still `UNKNOWN`.
    #[tokio::test]
    async fn the_answer_to_a_request_that_is_not_grpc_is_passed_on_untouched() {
        let answer_json = |request_type: &'static str| {
            let svc = GrpcStatusLayer::new().layer(service_fn(|_: http::Request<()>| async {
                let mut res = Response::new(Full::new(Bytes::from_static(b"{\"id\":7}")));
                res.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Ok::<_, BoxError>(res)
            }));
            let req = http::Request::post("http://a/orders/7")
                .header(http::header::CONTENT_TYPE, request_type)
                .body(())
                .unwrap();
            async move {
                let (parts, body) = svc.oneshot(req).await.unwrap().into_parts();
                (parts, body.collect().await.unwrap().to_bytes())
            }
        };
        let (parts, data) = answer_json("application/json").await;
        assert!(parts.headers.get("grpc-status").is_none());
        assert!(parts.extensions.get::<GrpcOutcome>().is_none());
        assert_eq!(&data[..], b"{\"id\":7}");
        let (parts, _) = answer_json("application/grpc").await;
        assert_eq!(parts.headers["grpc-status"], "2");
    }

    /// A request without a content type (a REST `GET`, a Connect `GET`) is known by its
    /// answer: one with another content type and no `grpc-status` is passed on
    /// untouched. (It was read as a gRPC call's: emptied and stamped `UNKNOWN`, so every
    /// healthy `GET` counted as a failure above.) An answer in gRPC's content type, or
    /// with a `grpc-status`, is still read.
    #[tokio::test]
    async fn a_request_without_a_content_type_is_known_by_its_answer() {
        let answer = |content_type: &'static str, status: Option<&'static str>| {
            let svc =
                GrpcStatusLayer::new().layer(service_fn(move |_: http::Request<()>| async move {
                    let mut res = Response::new(Full::new(Bytes::from_static(b"{\"id\":7}")));
                    res.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static(content_type),
                    );
                    if let Some(status) = status {
                        res.headers_mut()
                            .insert("grpc-status", HeaderValue::from_static(status));
                    }
                    Ok::<_, BoxError>(res)
                }));
            let req = http::Request::get("http://a/orders/7").body(()).unwrap();
            async move {
                let (parts, body) = svc.oneshot(req).await.unwrap().into_parts();
                (parts, body.collect().await.unwrap().to_bytes())
            }
        };
        let (parts, data) = answer("application/json", None).await;
        assert!(parts.headers.get("grpc-status").is_none());
        assert!(parts.extensions.get::<GrpcOutcome>().is_none());
        assert_eq!(&data[..], b"{\"id\":7}");
        let (parts, _) = answer("application/grpc", None).await;
        assert_eq!(parts.headers["grpc-status"], "2");
        let (parts, _) = answer("text/plain", Some("14")).await;
        let outcome = parts.extensions.get::<GrpcOutcome>().unwrap();
        assert_eq!(outcome.code(), GrpcCode::Unavailable);
    }

    #[tokio::test]
    async fn a_missing_status_is_unknown_in_the_headers() {
        let (parts, _, _, _) = call(GrpcStatusLayer::new(), b"msg", None).await;
        assert_eq!(parts.headers["grpc-status"], "2");
        let outcome = parts.extensions.get::<GrpcOutcome>().unwrap();
        assert_eq!(outcome.code(), GrpcCode::Unknown);
        assert!(outcome.classification().is_failure());
    }

    /// Trailers without a `grpc-status` keep their metadata under the `UNKNOWN`
    /// status that stands in (it was dropped).
    #[tokio::test]
    async fn trailers_without_a_status_keep_their_metadata() {
        let t = trailers(&[("x-request-id", "r-7"), ("grpc-message", "ignored")]);
        let (parts, _, _, _) = call(GrpcStatusLayer::new(), b"msg", Some(t)).await;
        assert_eq!(parts.headers["grpc-status"], "2");
        assert_eq!(parts.headers["grpc-message"], "missing%20grpc-status");
        assert_eq!(parts.headers["x-request-id"], "r-7");
    }

    #[tokio::test]
    async fn an_ok_response_keeps_its_body_and_trailers() {
        let t = trailers(&[("grpc-status", "0"), ("x-meta", "kept")]);
        let (parts, data, trailers, buffered) = call(GrpcStatusLayer::new(), b"msg", Some(t)).await;
        assert!(buffered);
        assert!(parts.headers.get("grpc-status").is_none());
        assert_eq!(&data[..], b"msg");
        assert_eq!(trailers.unwrap()["x-meta"], "kept");
        let outcome = parts.extensions.get::<GrpcOutcome>().unwrap();
        assert_eq!(outcome.code(), GrpcCode::Ok);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_streams_through_whole() {
        let t = trailers(&[("grpc-status", "13")]);
        let (parts, data, trailers, buffered) =
            call(GrpcStatusLayer::new().with_limit(2), b"message", Some(t)).await;
        assert!(!buffered);
        assert!(parts.headers.get("grpc-status").is_none(), "not promoted");
        assert!(parts.extensions.get::<GrpcOutcome>().is_none());
        assert_eq!(&data[..], b"message");
        assert_eq!(trailers.unwrap()["grpc-status"], "13");
    }

    type Seen = std::sync::Arc<std::sync::Mutex<Vec<GrpcOutcome>>>;

    /// Records every outcome reported to it.
    struct Record(Seen);

    impl OnGrpcStatus for Record {
        fn on_grpc_status(&self, outcome: &GrpcOutcome) {
            self.0.lock().unwrap().push(*outcome);
        }
    }

    /// A status layer whose hook records every outcome, and what it recorded.
    fn recording() -> (GrpcStatusLayer<Record>, Seen) {
        let seen = Seen::default();
        (GrpcStatusLayer::new().on_status(Record(seen.clone())), seen)
    }

    /// A request without a content type is no gRPC client's: its answer without one (a
    /// `DELETE`'s `204`, an empty `200`, a bare `200 pong`) is passed on untouched and
    /// reported to no hook. (It was read as a gRPC call's: the `204` reported
    /// `UNKNOWN`, a failure, and the `200`s emptied and stamped `grpc-status: 2`.)
    #[tokio::test]
    async fn a_request_without_a_content_type_answered_without_one_is_passed_on() {
        for (status, data) in [(204, ""), (200, ""), (200, "pong")] {
            let (layer, seen) = recording();
            let svc = layer.layer(service_fn(move |_: http::Request<()>| async move {
                let mut res = Response::new(Full::new(Bytes::from_static(data.as_bytes())));
                *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
                Ok::<_, BoxError>(res)
            }));
            let req = http::Request::delete("http://a/orders/7").body(()).unwrap();
            let (parts, body) = svc.oneshot(req).await.unwrap().into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            assert_eq!(parts.status.as_u16(), status);
            assert!(
                parts.headers.get("grpc-status").is_none(),
                "{status} {data}"
            );
            assert!(parts.extensions.get::<GrpcOutcome>().is_none(), "{status}");
            assert_eq!(&body[..], data.as_bytes());
            assert!(seen.lock().unwrap().is_empty(), "{status} {data}");
        }
    }

    /// A streamed binary gRPC-Web answer (a streaming method, or one over the limit)
    /// is reported with the status of its trailers frame, however its chunks cut the
    /// frames. (Its end was read for HTTP trailers only, which gRPC-Web never sends:
    /// every one was reported `UNKNOWN`, a failure, an OK one too.)
    #[tokio::test]
    async fn a_streamed_grpc_web_answer_is_reported_with_the_status_of_its_trailers_frame() {
        for (status, code) in [("0", GrpcCode::Ok), ("14", GrpcCode::Unavailable)] {
            let mut body = web_frame(0, b"first message");
            body.extend(web_frame(0, b""));
            body.extend(web_frame(0, b"second"));
            body.extend(web_frame(
                0x80,
                format!("grpc-status: {status}\r\ngrpc-message: m\r\n").as_bytes(),
            ));
            for cut in [1, 3, 7, 64] {
                let chunks: Vec<Bytes> = body.chunks(cut).map(Bytes::copy_from_slice).collect();
                for streaming_method in [true, false] {
                    let (layer, seen) = recording();
                    let layer = if streaming_method {
                        layer.stream_through("/echo.Echo/*").unwrap()
                    } else {
                        layer.with_limit(4)
                    };
                    let chunks = chunks.clone();
                    let svc = layer.layer(service_fn(move |_: http::Request<()>| {
                        let frames = chunks
                            .clone()
                            .into_iter()
                            .map(|c| Ok::<_, BoxError>(http_body::Frame::data(c)));
                        let mut res = Response::new(http_body_util::StreamBody::new(
                            tokio_stream::iter(frames),
                        ));
                        res.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            HeaderValue::from_static("application/grpc-web+proto"),
                        );
                        async move { Ok::<_, BoxError>(res) }
                    }));
                    let req = http::Request::post("http://a/echo.Echo/Watch")
                        .header(http::header::CONTENT_TYPE, "application/grpc")
                        .body(())
                        .unwrap();
                    let res = svc.oneshot(req).await.unwrap();
                    assert!(!res.body().is_buffered());
                    let data = res.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(&data[..], &body[..], "the body goes on as it was");
                    let seen = seen.lock().unwrap();
                    assert_eq!(seen.len(), 1);
                    assert!(seen[0].is_streamed());
                    assert_eq!(seen[0].code(), code, "cut {cut}, {streaming_method}");
                }
            }
        }
    }

    /// A streamed gRPC-Web body cut short inside its trailers frame has no status
    /// (`UNKNOWN`); bytes after a whole trailers frame are not read, as in a buffered
    /// answer; a trailers frame too long to keep is none. Fed a byte at a time and
    /// whole alike.
    #[test]
    fn a_grpc_web_trailers_frame_cut_short_is_no_status() {
        let whole = web_frame(0x80, b"grpc-status: 5\r\n");
        let scan = |bytes: &[u8]| {
            let mut whole = WebScan::default();
            whole.feed(bytes);
            let mut bytewise = WebScan::default();
            for b in bytes {
                bytewise.feed(std::slice::from_ref(b));
            }
            let (a, b) = (whole.trailers(), bytewise.trailers());
            assert_eq!(a, b);
            a.and_then(|t| GrpcCode::from_headers(&t))
        };
        assert_eq!(scan(&whole), Some(GrpcCode::NotFound));
        assert_eq!(scan(&whole[..whole.len() - 1]), None);
        assert_eq!(scan(&whole[..3]), None);
        let mut followed = whole.clone();
        followed.extend(web_frame(0, b"x"));
        assert_eq!(scan(&followed), Some(GrpcCode::NotFound));
        assert_eq!(scan(&web_frame(0x80, b"")), None);
        let mut huge = vec![0x80];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(scan(&huge), None);
        // Whole frames: one of the longest kept (64 KiB) is read, one a byte longer is
        // none.
        let padded = |len: usize| {
            let mut lines = b"grpc-status: 5\r\nx-pad: ".to_vec();
            lines.resize(len - 2, b'a');
            lines.extend_from_slice(b"\r\n");
            web_frame(0x80, &lines)
        };
        assert_eq!(scan(&padded(64 * 1024)), Some(GrpcCode::NotFound));
        assert_eq!(scan(&padded(64 * 1024 + 1)), None);
    }

    /// Only a binary gRPC-Web content type is followed for a trailers frame, the same
    /// types a buffered answer's is read for.
    #[test]
    fn only_binary_grpc_web_answers_are_scanned_for_a_trailers_frame() {
        for (content_type, scanned) in [
            ("application/grpc-web", true),
            ("application/grpc-web+proto", true),
            ("application/GRPC-WEB;charset=utf-8", true),
            ("application/grpc-web-text", false),
            ("application/grpc-webx", false),
            ("application/grpc", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(content_type),
            );
            assert_eq!(
                WebScan::for_response(&h).is_some(),
                scanned,
                "{content_type}"
            );
        }
    }

    #[tokio::test]
    async fn a_streaming_method_is_returned_at_once_and_reported_at_its_end() {
        let (layer, seen) = recording();
        let layer = layer.stream_through("/echo.Echo/*").unwrap();
        let svc = layer.layer(service_fn(|_: http::Request<()>| async {
            let t = trailers(&[("grpc-status", "14")]);
            let body = Full::new(Bytes::from_static(b"m"))
                .map_err(|e| -> BoxError { match e {} })
                .with_trailers(std::future::ready(Some(Ok(t))));
            Ok::<_, BoxError>(Response::new(body))
        }));
        let req = http::Request::post("http://a/echo.Echo/Watch")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(())
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert!(!res.body().is_buffered());
        assert!(seen.lock().unwrap().is_empty(), "nothing known yet");
        let collected = res.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].is_streamed());
        assert_eq!(seen[0].code(), GrpcCode::Unavailable);
    }

    /// A body that fails while it is buffered (a reset stream) is reported to the hook
    /// as a failure, like every other response, not only returned as an error.
    #[tokio::test]
    async fn a_body_error_while_buffering_is_reported_to_the_hook() {
        let (layer, seen) = recording();
        let svc = layer.layer(service_fn(|_: http::Request<()>| async {
            let frames = vec![
                Ok(http_body::Frame::data(Bytes::from_static(b"par"))),
                Err(BoxError::from(tonic::Status::unavailable("reset"))),
            ];
            let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
            Ok::<_, BoxError>(Response::new(body))
        }));
        let err = svc.oneshot(grpc_request()).await.unwrap_err();
        assert!(err.to_string().contains("reset"), "{err}");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].code(), GrpcCode::Unavailable);
        assert!(seen[0].classification().is_failure());
        assert!(!seen[0].is_streamed());
    }

    /// A body that fails with a status is classified by the layer's classifier, as a
    /// status in the trailers is: an override of the code applies. (It went by the
    /// default classes: a `NOT_FOUND` declared a failure was reported a success.)
    #[tokio::test]
    async fn a_body_error_is_classified_by_the_layers_classifier() {
        for (classifier, failure) in [
            (GrpcClassifier::new(), false),
            (
                GrpcClassifier::new().with_failure(GrpcCode::NotFound, false),
                true,
            ),
        ] {
            let (layer, seen) = recording();
            let svc =
                layer
                    .with_classifier(classifier)
                    .layer(service_fn(|_: http::Request<()>| async {
                        let frames = vec![Err::<http_body::Frame<Bytes>, _>(BoxError::from(
                            tonic::Status::not_found("no order"),
                        ))];
                        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
                        Ok::<_, BoxError>(Response::new(body))
                    }));
            svc.oneshot(grpc_request()).await.unwrap_err();
            let seen = seen.lock().unwrap();
            assert_eq!(seen[0].code(), GrpcCode::NotFound);
            assert_eq!(seen[0].classification().is_failure(), failure);
        }
    }

    /// A streamed response that ends without trailers is reported (`UNKNOWN`) to a
    /// reader that stops as soon as the body says it is at its end, as hyper does.
    #[tokio::test]
    async fn a_streamed_body_without_trailers_is_reported_to_a_reader_stopping_at_its_end() {
        let (layer, seen) = recording();
        let layer = layer.stream_through("/echo.Echo/*").unwrap();
        let svc = layer.layer(service_fn(|_: http::Request<()>| async {
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"m"))))
        }));
        let req = http::Request::post("http://a/echo.Echo/Watch")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(())
            .unwrap();
        let mut body = svc.oneshot(req).await.unwrap().into_body();
        while !body.is_end_stream() {
            body.frame().await;
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "never reported");
        assert_eq!(seen[0].code(), GrpcCode::Unknown);
    }

    #[tokio::test]
    async fn a_trailers_only_response_passes_through() {
        let svc = GrpcStatusLayer::new().layer(service_fn(|_: http::Request<()>| async {
            let res = Response::builder()
                .header("grpc-status", "5")
                .body(Full::new(Bytes::new()))
                .unwrap();
            Ok::<_, BoxError>(res)
        }));
        let res = svc.oneshot(http::Request::new(())).await.unwrap();
        let outcome = res.extensions().get::<GrpcOutcome>().unwrap();
        assert_eq!(outcome.code(), GrpcCode::NotFound);
        assert!(outcome.classification().is_success());
        assert!(!outcome.is_streamed());
    }
}
