//! HTTP glue: reqwest as a `tower::Service`, hyper-util's legacy client, errors answered
//! as responses for axum, replayable request bodies and the `Idempotency-Key` header.
//!
//! * [`body`]: [`BufferBodyLayer`](body::BufferBodyLayer) buffers a request body up to
//!   a limit so the retry layer (and the enqueue fallback) can send it again; a larger
//!   body is streamed through once and marked [`BodyNotReplayable`](body::BodyNotReplayable).
//! * [`idempotency_key`]: the header, the idempotent methods, and a generator.
//!
//! # Example
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use postbox::http::body::{BufferBodyLayer, ReplayBody};
//! use postbox::retry::RetryLayer;
//! use tower::{ServiceBuilder, service_fn};
//!
//! # fn main() -> Result<(), postbox::error::ConfigError> {
//! let client = ServiceBuilder::new()
//!     .layer(BufferBodyLayer::new(64 * 1024))
//!     .layer(RetryLayer::http().build()?)
//!     .service(service_fn(|req: http::Request<ReplayBody<Full<Bytes>>>| async move {
//!         // Every attempt gets the whole body (or, above 64 KiB, the one attempt does).
//!         let _ = req.body().buffered_bytes();
//!         Ok::<_, postbox::BoxError>(http::Response::new(()))
//!     }));
//! # let _ = client;
//! # Ok(()) }
//! ```

pub mod body;
#[cfg(feature = "hyper")]
pub mod hyper;
pub mod idempotency_key;
#[cfg(feature = "reqwest")]
pub mod reqwest;
mod respond;

pub use self::respond::{ErrorResponse, ErrorResponseLayer};

/// Whether a request to `path` calls a method `pattern` names: `/package.Service/Method`,
/// or `/package.Service/*` for every method of the service (the leading `/` may be left
/// out). Compared with the path's last two segments, so a channel whose origin has a
/// path prefix still matches, and `/pkg.Svc/*` does not match `/pkg.SvcAdmin/…`. Any
/// other pattern ending in `*` matches those two segments by prefix.
pub(crate) fn names_method(pattern: &str, path: &str) -> bool {
    let pattern = pattern.strip_prefix('/').unwrap_or(pattern);
    let Some(method_at) = path.rfind('/') else {
        return false;
    };
    let service_at = path[..method_at].rfind('/').map_or(0, |i| i + 1);
    let tail = &path[service_at..]; // "package.Service/Method"
    if let Some(service) = pattern.strip_suffix("/*") {
        return &path[service_at..method_at] == service;
    }
    match pattern.strip_suffix('*') {
        Some(prefix) => tail.starts_with(prefix),
        None => tail == pattern,
    }
}

/// Whether `headers` are a gRPC (or gRPC-Web) message's, by the content type
/// (`application/grpc…`, in any case: media types are case-insensitive).
pub(crate) fn is_grpc(headers: &::http::HeaderMap) -> bool {
    grpc_kind(headers).is_some()
}

/// Whether the request is a Connect-protocol call: a stream (`application/connect+proto`,
/// `+json`, …), whose body, like a gRPC stream's, may end only after its answer begins,
/// or a unary call (`connect-protocol-version`), whose client reads a `202` as an
/// error.
pub(crate) fn is_connect(headers: &::http::HeaderMap) -> bool {
    headers.contains_key("connect-protocol-version") || is_connect_stream(headers)
}

/// Whether `headers` are a Connect-protocol stream's, by the content type
/// (`application/connect+proto`, `+json`, …, in any case).
pub(crate) fn is_connect_stream(headers: &::http::HeaderMap) -> bool {
    headers
        .get(::http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().get(..b"application/connect+".len()))
        .is_some_and(|h| h.eq_ignore_ascii_case(b"application/connect+"))
}

/// A gRPC request's protocol, by its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GrpcKind {
    /// `application/grpc…`
    Grpc,
    /// `application/grpc-web` (binary, `+proto`, …)
    Web,
    /// `application/grpc-web-text…` (base64)
    WebText,
}

/// The gRPC protocol of a request with `headers`, or `None` if it is not gRPC.
pub(crate) fn grpc_kind(headers: &::http::HeaderMap) -> Option<GrpcKind> {
    let v = headers.get(::http::header::CONTENT_TYPE)?.as_bytes();
    let starts = |p: &[u8]| v.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
    if starts(b"application/grpc-web-text") {
        Some(GrpcKind::WebText)
    } else if starts(b"application/grpc-web") {
        Some(GrpcKind::Web)
    } else if starts(b"application/grpc") {
        Some(GrpcKind::Grpc)
    } else {
        None
    }
}

impl GrpcKind {
    /// The content type of an answer in this protocol.
    pub(crate) fn content_type(self) -> ::http::HeaderValue {
        ::http::HeaderValue::from_static(match self {
            GrpcKind::Grpc => "application/grpc",
            GrpcKind::Web => "application/grpc-web+proto",
            GrpcKind::WebText => "application/grpc-web-text+proto",
        })
    }
}

/// Makes `headers` a trailers-only gRPC answer's (sent with `200 OK` and an empty
/// body): the protocol's content type, `grpc-status: code` and `grpc-message`
/// (percent-encoded as the gRPC wire spec says).
pub(crate) fn grpc_trailers_only(
    headers: &mut ::http::HeaderMap,
    kind: GrpcKind,
    code: u8,
    message: &str,
) {
    use std::fmt::Write;
    headers.insert(::http::header::CONTENT_TYPE, kind.content_type());
    headers.insert("grpc-status", ::http::HeaderValue::from(u16::from(code)));
    let mut encoded = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            encoded.push(char::from(b));
        } else {
            let _ = write!(encoded, "%{b:02X}");
        }
    }
    if let Ok(v) = ::http::HeaderValue::try_from(encoded) {
        headers.insert("grpc-message", v);
    }
}

/// The host (and port) a request is for, without userinfo (`user:pw@`, never to be
/// shown or used as a key): its URI's authority, or else its `Host` header.
pub(crate) fn host_of<'a>(uri: &'a ::http::Uri, headers: &'a ::http::HeaderMap) -> Option<&'a str> {
    let authority = match uri.authority() {
        Some(a) => a.as_str(),
        None => headers.get(::http::header::HOST)?.to_str().ok()?,
    };
    Some(
        authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host),
    )
}

/// [`method_pattern_problem`] as a [`ConfigError`](crate::error::ConfigError) of
/// `field`: the one check of every `stream_through` list, in code and in config files.
pub(crate) fn check_method_pattern(
    field: impl Into<std::borrow::Cow<'static, str>>,
    pattern: &str,
) -> Result<(), crate::error::ConfigError> {
    match method_pattern_problem(pattern) {
        Some(problem) => Err(crate::error::ConfigError::new(
            field,
            format!("({pattern:?}) {problem}"),
        )),
        None => Ok(()),
    }
}

/// Logs at `warn` a pattern that [`check_method_pattern`] refuses (a builder that
/// keeps it rather than fail).
pub(crate) fn warn_unless_method_pattern(field: &'static str, pattern: &str) {
    if let Err(e) = check_method_pattern(field, pattern) {
        tracing::warn!(error = %e, "postbox: a gRPC method pattern that names no method as meant");
    }
}

/// What is wrong with a [`names_method`] pattern, if anything: one matching every call
/// (`*`, `/*`), or one that can match none (empty, no `/` and no `*`, an empty method,
/// a `*` before the end, read as a literal `*`, or more than two segments, when only a
/// path's last two are compared), or by its method alone (an empty service, `//`).
fn method_pattern_problem(pattern: &str) -> Option<&'static str> {
    macro_rules! write_instead {
        ($what:literal) => {
            concat!(
                $what,
                ": write `/package.Service/Method`, or `/package.Service/*` for every \
                 method of a service"
            )
        };
    }
    let p = pattern.strip_prefix('/').unwrap_or(pattern);
    let wild = p.strip_suffix('*');
    let named = wild.unwrap_or(p);
    if named.contains('*') {
        return Some(write_instead!(
            "has a `*` before its end, which matches only a literal `*`, so it would match \
             no call"
        ));
    }
    if named.matches('/').count() >= 2 {
        return Some(
            "has more than two segments, so it would match no call: only a path's last \
             two, `package.Service/Method`, are compared",
        );
    }
    match (wild.is_some(), named) {
        (true, "") => Some(write_instead!(
            "names no service and would match every call"
        )),
        (_, n) if n.starts_with('/') => Some(write_instead!(
            "names no service (`//`), so it would match calls by their method alone"
        )),
        (false, n) if !n.contains('/') || n.ends_with('/') => {
            Some(write_instead!("names no method, so it would match no call"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_message_is_percent_encoded_and_the_kind_read_from_the_content_type() {
        let mut headers = ::http::HeaderMap::new();
        grpc_trailers_only(&mut headers, GrpcKind::Grpc, 14, "100% — busy\n");
        assert_eq!(headers["grpc-status"], "14");
        assert_eq!(headers["grpc-message"], "100%25 %E2%80%94 busy%0A");
        assert_eq!(headers["content-type"], "application/grpc");
        for (content_type, kind) in [
            ("application/grpc", Some(GrpcKind::Grpc)),
            ("Application/GRPC+proto", Some(GrpcKind::Grpc)),
            ("application/grpc-web", Some(GrpcKind::Web)),
            ("application/grpc-web+json", Some(GrpcKind::Web)),
            ("application/grpc-web-text+proto", Some(GrpcKind::WebText)),
            ("application/json", None),
        ] {
            let mut h = ::http::HeaderMap::new();
            h.insert(::http::header::CONTENT_TYPE, content_type.parse().unwrap());
            assert_eq!(grpc_kind(&h), kind, "{content_type}");
        }
    }
}
