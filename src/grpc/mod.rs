//! tonic glue: the gRPC status from the trailers made visible to the layers, and our
//! errors as `tonic::Status`.
//!
//! # The problem: the status comes last
//! A gRPC response carries its status in the HTTP/2 *trailers*, after the messages —
//! except "trailers-only" responses (most errors a server raises before sending a
//! message), which carry it in the headers. A tower layer's future completes when the
//! *headers* arrive, so a breaker or a retry around a tonic `Channel` sees
//! `200 OK` without a `grpc-status` and must call it a provisional success
//! ([`GrpcClassifier`](crate::classify::GrpcClassifier) does). A handler that fails
//! after it has started answering — or a server or proxy that always sends the status
//! in trailers — would go unseen.
//!
//! # The choice: read unary bodies before answering
//! [`GrpcStatusLayer`] sits **innermost**, right around the `Channel`. For each response
//! to a gRPC call whose status is not already in the headers, it reads the body — up to
//! a limit, 64 KiB by default — before it returns the response (the answer to a request
//! in another content type, or to one without a content type (no gRPC client's)
//! answered without gRPC's content type and without `grpc-status`, is passed on
//! untouched):
//!
//! * **non-OK status in the trailers** (or no status at all, which is `UNKNOWN`): the
//!   response is rewritten into the equivalent trailers-only response — the trailers
//!   (`grpc-status`, `grpc-message`, `grpc-status-details-bin`,
//!   `grpc-retry-pushback-ms`, custom metadata) move into the headers and the body is
//!   empty. Every layer above classifies it from the headers, exactly, and tonic's
//!   client reads it as the same `Status` it would have read from the trailers;
//! * **OK**: the response keeps its body and trailers, now held in memory
//!   ([`GrpcStatusBody::is_buffered`]); the provisional success above is final;
//! * **non-OK after two messages or more** (a server stream not named below): kept
//!   as it came, the status in the trailers — tonic would stop at a status in the
//!   headers and drop the messages. The layers above see a success; the
//!   [`GrpcOutcome`] in the extensions and the hook have the status;
//! * **longer than the limit**: the response is returned once the limit is passed and
//!   streamed through; its status is known only when the stream ends, too late for a
//!   retry, so it is classified then and reported to the [`OnGrpcStatus`] hook;
//! * **a streaming method** named with
//!   [`stream_through`](GrpcStatusLayer::stream_through): returned as soon as its
//!   headers arrive, reported to the hook when it ends. Name every server-streaming and
//!   bidirectional method: a long stream of small messages would otherwise be held
//!   until it ends (and an attempt timeout around it would cut it).
//!
//! A gRPC-Web answer (binary, or base64 `-text`, decoded to be read) is read the same
//! way, its status taken from the trailers frame that ends its body.
//!
//! A non-200 answer to a gRPC call without a `grpc-status` (a proxy's `502` page, a
//! load balancer's `503`) becomes trailers-only with the status the gRPC spec maps its
//! HTTP status to (`UNAVAILABLE` for `429`, `502`, `503`, `504`) and a `grpc-message`
//! naming the HTTP status; its page is dropped. tonic would read the page as gRPC
//! frames and answer `INTERNAL`.
//!
//! Either way the final [`GrpcOutcome`] is put in the response's extensions when it is
//! known before returning. A streamed gRPC-Web answer (`application/grpc-web`, binary)
//! is reported with the status of the trailers frame that ends its body; a streamed
//! base64 one (`application/grpc-web-text`) is not decoded on the way, and is reported
//! `UNKNOWN`.
//!
//! Why not a body that reports to the breaker at the end of every stream? A retry
//! cannot act on a status it learns after it handed the response to the caller, so
//! for the calls that matter — unary calls, whose response is one message — reading
//! the body first is the only way a retry can see the status; a breaker gets the same
//! answer for free. Unary responses are small and tonic buffers each message anyway, so
//! the cost is one copy at most (none for a single-frame body). Streams keep streaming
//! and report through the hook; wiring that hook into a breaker's record is left to the
//! caller.
//!
//! # The stack around a `Channel`
//! ```text
//! IntoStatus ─► BufferBody ─► Retry ─► CircuitBreaker ─► Bulkhead ─► AttemptTimeout ─► GrpcStatus ─► Channel
//! ```
//! [`IntoStatusLayer`] outermost turns our errors into a `tonic::Status` the generated
//! client returns as is (an open breaker → `UNAVAILABLE` with `grpc-retry-pushback-ms`,
//! not `UNKNOWN`). gRPC calls are all `POST`s: a retry needs the request body
//! replayable ([`BufferBodyLayer`](crate::http::body::BufferBodyLayer)) and to be told
//! which methods are safe to repeat ([`GrpcRequests`]). Name every client-streaming
//! and bidirectional method with the buffer's
//! [`stream_through`](crate::http::body::BufferBodyLayer::stream_through) (its request
//! body is a stream that may wait for answers: it must not be read first), and every
//! server-streaming and bidirectional one with [`GrpcStatusLayer::stream_through`].
//! The `tonic_client` example builds this stack.
//!
//! # Example
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use postbox::classify::{Class, Classify, GrpcClassifier};
//! use postbox::grpc::{GrpcOutcome, GrpcStatusLayer};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), postbox::BoxError> {
//! // A server that answers 200 and reports UNAVAILABLE in the trailers.
//! let channel = service_fn(|_req: http::Request<()>| async {
//!     let mut trailers = http::HeaderMap::new();
//!     trailers.insert("grpc-status", "14".parse().unwrap());
//!     let body = Full::new(Bytes::new()).with_trailers(std::future::ready(Some(Ok(trailers))));
//!     let mut res = http::Response::new(body);
//!     res.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
//!     Ok::<_, std::convert::Infallible>(res)
//! });
//! let call = http::Request::post("http://shop/shop.Catalog/Get")
//!     .header("content-type", "application/grpc")
//!     .body(())?;
//! let res = GrpcStatusLayer::new().layer(channel).oneshot(call).await?;
//!
//! // The status is now in the headers, where every layer looks.
//! assert_eq!(res.headers()["grpc-status"], "14");
//! let c = Classify::<_, postbox::BoxError>::classify(&GrpcClassifier::new(), Ok(&res));
//! assert_eq!(c.class(), Class::Failure);
//! assert!(c.is_retryable());
//! assert!(!res.extensions().get::<GrpcOutcome>().unwrap().is_streamed());
//! # Ok(()) }
//! ```

mod body;
pub mod future;
pub mod into_status;
mod layer;
mod requests;
mod service;

pub use self::body::GrpcStatusBody;
pub use self::into_status::{IntoStatus, IntoStatusLayer, into_status};
pub use self::layer::{DEFAULT_BUFFER_LIMIT, GrpcStatusLayer};
pub use self::requests::GrpcRequests;
pub use self::service::GrpcStatus;

use crate::classify::Classification;
use crate::classify::grpc::GrpcCode;

/// The final gRPC status of one response and its classification.
///
/// Put in the response's extensions by [`GrpcStatus`] when the status is known before
/// the response is returned, and given to the [`OnGrpcStatus`] hook for every response
/// to a gRPC call (a request whose content type is another's, a REST route or a
/// Connect call behind the same stack, is passed on untouched, as is the answer to a
/// request without a content type, a `GET`, when it has neither gRPC's content type
/// nor a `grpc-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcOutcome {
    code: GrpcCode,
    classification: Classification,
    streamed: bool,
}

// === impl GrpcOutcome ===

impl GrpcOutcome {
    pub(crate) fn new(code: GrpcCode, classification: Classification, streamed: bool) -> Self {
        Self {
            code,
            classification,
            streamed,
        }
    }

    /// The status code (`UNKNOWN` when the response carried none).
    pub fn code(&self) -> GrpcCode {
        self.code
    }

    /// How the layer's classifier classifies it.
    pub fn classification(&self) -> Classification {
        self.classification
    }

    /// `true` when the body was too long to read first: the status was learnt at the
    /// end of the stream, after the layers above had seen the response.
    pub fn is_streamed(&self) -> bool {
        self.streamed
    }
}

/// Called with the final outcome of every response to a gRPC call that goes through
/// [`GrpcStatus`].
///
/// Implemented for `()` (nothing) and for closures `Fn(&GrpcOutcome)`. For a streamed
/// response it is called from the body, when the trailers arrive, so it should be
/// quick.
pub trait OnGrpcStatus {
    /// Sees one final outcome.
    fn on_grpc_status(&self, outcome: &GrpcOutcome);
}

impl OnGrpcStatus for () {
    #[inline]
    fn on_grpc_status(&self, _: &GrpcOutcome) {}
}

impl<F: Fn(&GrpcOutcome)> OnGrpcStatus for F {
    fn on_grpc_status(&self, outcome: &GrpcOutcome) {
        self(outcome)
    }
}

pub(crate) use crate::http::names_method;

#[cfg(test)]
mod tests {
    use super::names_method;

    /// `/pkg.Svc/*` names the methods of `pkg.Svc` only (it matched `/pkg.SvcAdmin/…`
    /// as a plain prefix); a pattern without its leading `/` still matches (it never
    /// did); a path with a prefix before `/package.Service/Method` matches.
    #[test]
    fn method_patterns_match_whole_segments() {
        assert!(names_method("/pkg.Svc/*", "/pkg.Svc/Do"));
        assert!(!names_method("/pkg.Svc/*", "/pkg.SvcAdmin/Do"));
        assert!(names_method("/pkg.Svc/Do", "/pkg.Svc/Do"));
        assert!(!names_method("/pkg.Svc/Do", "/pkg.Svc/DoMore"));
        assert!(names_method("pkg.Svc/Do", "/pkg.Svc/Do"));
        assert!(names_method("/pkg.Svc/Do", "/api/v1/pkg.Svc/Do"));
        assert!(names_method("/pkg.Svc/*", "/api/pkg.Svc/Do"));
        assert!(names_method("/shop.*", "/shop.Catalog/List"));
        assert!(!names_method("/pkg.Svc/Do", "/"));
        assert!(!names_method("/pkg.Svc/Do", ""));
    }
}
