//! Request codecs: how a request becomes an envelope and comes back for replay.

use crate::BoxError;
use crate::queue::Envelope;
use bytes::Bytes;

/// The parts of a request an [`Envelope`] stores (the layer adds the id, idempotency
/// key, times, attempt count and reason). `Debug` redacts credentials as
/// [`Envelope`]'s does.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// Logical destination (for HTTP, the request's authority as the per-host breaker
    /// keys it: `api:8080`, or `api` for `http://API:80`; in lower case, without
    /// userinfo or the scheme's default port).
    pub destination: String,
    /// Request method, or a codec-defined verb (a gRPC path, an operation name).
    pub method: String,
    /// Request URI (for HTTP, absolute when the request had one); its path is what
    /// [`DeferPolicy`](super::DeferPolicy) routes match against.
    pub uri: String,
    /// Headers or metadata, in order; values are raw bytes.
    pub headers: Vec<(String, Bytes)>,
    /// The encoded request body.
    pub body: Bytes,
}

impl std::fmt::Debug for Captured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::queue::envelope::{BodyLen, RedactedHeaders, RedactedUri};
        f.debug_struct("Captured")
            .field("destination", &self.destination)
            .field("method", &self.method)
            .field("uri", &RedactedUri(&self.uri))
            .field("headers", &RedactedHeaders(&self.headers))
            .field("body", &BodyLen(self.body.len()))
            .finish()
    }
}

/// Turns requests of type `Req` into envelope fields and back — what the typed flavour
/// ([`Defer`](super::Defer)) and the [`Replayer`](super::Replayer) need for any
/// request type.
///
/// # Example
/// A codec for a plain `String` command:
/// ```
/// use bytes::Bytes;
/// use postbox::BoxError;
/// use postbox::enqueue::{Captured, RequestCodec};
/// use postbox::queue::Envelope;
///
/// #[derive(Clone)]
/// struct Command { key: Option<String>, text: String }
///
/// struct CommandCodec;
///
/// impl RequestCodec<Command> for CommandCodec {
///     fn idempotency_key(&self, req: &Command) -> Option<String> { req.key.clone() }
///     fn set_idempotency_key(&self, req: &mut Command, key: &str) { req.key = Some(key.into()) }
///     fn capture(&self, req: &Command) -> Option<Captured> {
///         Some(Captured { method: "RUN".into(), body: Bytes::from(req.text.clone()), ..Default::default() })
///     }
///     fn rebuild(&self, env: &Envelope) -> Result<Command, BoxError> {
///         Ok(Command { key: Some(env.idempotency_key.clone()), text: String::from_utf8(env.body.to_vec())? })
///     }
/// }
/// ```
pub trait RequestCodec<Req> {
    /// The idempotency key the request already carries, if any.
    fn idempotency_key(&self, req: &Req) -> Option<String>;

    /// Stamps `key` on the request, so the original attempt carries it.
    fn set_idempotency_key(&self, req: &mut Req, key: &str);

    /// Captures the request for an envelope; `None` if it cannot be captured (then it is
    /// never deferred, and its outcome is returned unchanged).
    fn capture(&self, req: &Req) -> Option<Captured>;

    /// Rebuilds the request from an envelope for a replay, carrying the envelope's
    /// idempotency key.
    ///
    /// # Errors
    /// An envelope that cannot be turned back into a request; the replayer
    /// dead-letters it.
    fn rebuild(&self, envelope: &Envelope) -> Result<Req, BoxError>;

    /// Puts an [`AttemptLog`](crate::retry::AttemptLog) on a rebuilt request and returns
    /// it, if the request type can carry one: a retry layer in the replay stack then
    /// notes an attempt that reached the dependency, so a replay its retries end on an
    /// open breaker still counts. The default carries none.
    fn attempt_log(&self, req: &mut Req) -> Option<crate::retry::AttemptLog> {
        let _ = req;
        None
    }
}

#[cfg(feature = "http")]
pub use self::http_codec::HttpCodec;

#[cfg(feature = "http")]
pub(crate) mod http_codec {
    use super::{Captured, RequestCodec};
    use crate::BoxError;
    use crate::enqueue::BufferedBody;
    use crate::enqueue::receipt::IDEMPOTENCY_KEY_HEADER;
    use crate::queue::Envelope;
    use bytes::Bytes;
    use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};

    /// Headers never stored in an envelope: hop-by-hop headers (and those `connection`
    /// names), `content-length` (a replay sends the buffered body with its exact length),
    /// and the original call's deadline headers (a replay has its own deadline).
    /// `Proxy-Authorization` is the hop's, not the request's: a replay through an
    /// authenticating forward proxy gets it from the client the replayer sends with
    /// (reqwest's proxy settings), or the proxy answers `407`, a permanent refusal the
    /// message is dead-lettered for.
    const SKIPPED: [&str; 12] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        // The original call's deadline: stale for a replay, which gets its own.
        "postbox-timeout-ms",
        "grpc-timeout",
    ];

    /// The codec for `http::Request<BufferedBody<B>>`: method, URI, headers (without
    /// hop-by-hop ones) and the buffered body; the idempotency key travels in
    /// [`IDEMPOTENCY_KEY_HEADER`](crate::enqueue::IDEMPOTENCY_KEY_HEADER).
    ///
    /// A request whose body is not fully buffered cannot be captured.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct HttpCodec {
        _priv: (),
    }

    impl HttpCodec {
        /// The codec.
        pub const fn new() -> Self {
            Self { _priv: () }
        }
    }

    /// The idempotency key in `headers`, if the server's `Idempotency` layer can use it
    /// ([`key_in`](crate::http::idempotency_key::key_in)): as that layer reads it, so
    /// the queue de-duplicates `"k"` and `k` as one key. (The replay sends the header
    /// as the caller spelt it: see `rebuild`.)
    pub(crate) fn key_of(headers: &HeaderMap) -> Option<String> {
        headers
            .get(IDEMPOTENCY_KEY_HEADER)
            .and_then(crate::http::idempotency_key::key_in)
            .map(std::borrow::Cow::into_owned)
    }

    /// Whether the request carries an idempotency key this layer cannot read (bytes
    /// outside visible ASCII, which `key_in` takes for no key). It is not replaced with
    /// a key of ours: a receiver that compares the raw bytes would see the caller's own
    /// retry of it as another request. So the request is never deferred and goes out
    /// as it is. (A blank key is no key to anyone, and is replaced.)
    pub(crate) fn has_unreadable_key(headers: &HeaderMap) -> bool {
        headers
            .get_all(IDEMPOTENCY_KEY_HEADER)
            .iter()
            .any(|v| v.to_str().is_err())
    }

    /// Whether the request opens a tunnel (`CONNECT`) or asks to switch protocols (an
    /// `Upgrade` its `Connection` header names, to anything but `h2c`): never deferred,
    /// whatever the policy. It cannot wait for a replay: any 2xx to a `CONNECT` tells
    /// the client its tunnel is open, and the `upgrade` header is not stored
    /// (hop-by-hop), so a replay would be a plain request. (An `Upgrade` without
    /// `Connection: upgrade` is ignored, RFC 9110 §7.8, and curl's `Upgrade: h2c` on an
    /// ordinary POST is answered as a plain request: those may be deferred.)
    pub(crate) fn opens_a_connection(method: &Method, headers: &HeaderMap) -> bool {
        if method == Method::CONNECT {
            return true;
        }
        let switching = tokens(headers, http::header::UPGRADE)
            .any(|p| !p.is_empty() && !p.eq_ignore_ascii_case("h2c"));
        switching
            && tokens(headers, http::header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"))
    }

    /// The comma-separated tokens of every `name` header, trimmed.
    pub(crate) fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
        headers
            .get_all(name)
            .into_iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    }

    /// Whether a header of `headers` travels end to end, so is stored and replayed: not
    /// one of [`SKIPPED`], nor named by their `connection` header (hop-by-hop too, RFC
    /// 9110 §7.6.1).
    fn end_to_end(headers: &HeaderMap) -> impl Fn(&HeaderName) -> bool + '_ {
        move |name| {
            !SKIPPED.contains(&name.as_str())
                && !tokens(headers, http::header::CONNECTION)
                    .any(|token| token.eq_ignore_ascii_case(name.as_str()))
        }
    }

    /// Sets the idempotency key header.
    fn set_key(headers: &mut HeaderMap, key: &str) {
        if let Ok(v) = HeaderValue::from_str(key) {
            headers.insert(HeaderName::from_static(IDEMPOTENCY_KEY_HEADER), v);
        }
    }

    /// Writes the key of a request that may be deferred into its headers: the key made
    /// for it (`made`), or only the first of the caller's. A request that goes out as
    /// it is (kept synchronous, a body over the limit) keeps its headers as they came.
    pub(crate) fn send_key(headers: &mut HeaderMap, key: &str, made: bool) {
        if made {
            set_key(headers, key);
        } else {
            keep_first_key(headers);
        }
    }

    /// Keeps only the first of several key headers, as it was spelt (quoted or bare):
    /// the request goes out with the one key it is stored under, or the first attempt
    /// and the replay would differ (and a server reading the last value would see two
    /// keys).
    fn keep_first_key(headers: &mut HeaderMap) {
        let mut values = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter();
        if let (Some(first), Some(_)) = (values.next().cloned(), values.next()) {
            headers.insert(HeaderName::from_static(IDEMPOTENCY_KEY_HEADER), first);
        }
    }

    /// The envelope fields of a request with this head and `body`.
    pub(crate) fn capture_head(
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Captured {
        let destination = destination_of(uri, headers);
        let keep = end_to_end(headers);
        let headers = headers
            .iter()
            .filter(|(name, _)| keep(name))
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    Bytes::copy_from_slice(value.as_bytes()),
                )
            })
            .collect();
        Captured {
            destination,
            method: method.as_str().to_owned(),
            uri: uri.to_string(),
            headers,
            body,
        }
    }

    /// The `idempotency-key` header a replay of `env` is sent with; `None` when the
    /// envelope's key cannot be one (blank, from another producer, or no header can
    /// carry it), and the message id is sent instead, as stable across its deliveries
    /// (a redrive keeps it as the key: see [`Envelope::redriven`]). Never sent without a
    /// key the receiver can de-duplicate on.
    ///
    /// The key goes out as the caller spelt it (quoted or bare) when the stored header
    /// reads as the envelope's key: the receiver then reads the key it read from the
    /// first attempt (`"a\"b"` sent bare would be another key).
    pub(crate) fn key_header(env: &Envelope) -> Option<HeaderValue> {
        let spelt = env
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(IDEMPOTENCY_KEY_HEADER))
            .and_then(|(_, value)| HeaderValue::from_bytes(value).ok())
            .filter(|value| {
                crate::http::idempotency_key::key_in(value)
                    .is_some_and(|key| key == env.idempotency_key.as_str())
            });
        spelt
            .or_else(|| HeaderValue::from_str(&env.idempotency_key).ok())
            .filter(|_| crate::enqueue::clock::usable_key(&env.idempotency_key))
    }

    /// Rebuilds an HTTP request with a buffered body from an envelope.
    pub(crate) fn rebuild_request<B>(env: &Envelope) -> Result<Request<BufferedBody<B>>, BoxError> {
        let method = Method::from_bytes(env.method.as_bytes())?;
        let uri: Uri = env.uri.parse()?;
        let mut req = Request::new(BufferedBody::full(env.body.clone()));
        // Held whole: a retry in the replay's stack replays it, however small its buffer.
        req.extensions_mut()
            .insert(crate::http::body::HeldWhole(env.body.len()));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let key = key_header(env).unwrap_or_else(|| {
            tracing::debug!(id = %env.id, "unusable idempotency key; sent with the message id");
            HeaderValue::from_str(&env.id.to_string()).expect("a message id is a header value")
        });
        // Room left for the layers the replay passes through, which add headers of
        // their own: a map filled to what it holds (24 576 names) panics on the next
        // insert. No request a client sends comes near.
        const MAX_HEADERS: usize = 8192;
        if env.headers.len() > MAX_HEADERS {
            return Err(format!(
                "an envelope with {} header fields: a replayed request carries at most {MAX_HEADERS}",
                env.headers.len()
            )
            .into());
        }
        let headers = req.headers_mut();
        for (name, value) in &env.headers {
            let name = HeaderName::from_bytes(name.as_bytes())?;
            let mut value = HeaderValue::from_bytes(value)?;
            // A stored value loses the flag: credentials get it back.
            if crate::queue::envelope::is_credential(name.as_str()) {
                value.set_sensitive(true);
            }
            headers.append(name, value);
        }
        // Filtered again, as at capture: an envelope from another producer (or an older
        // version) may carry hop-by-hop or stale deadline headers a replay must not send.
        let dropped: Vec<HeaderName> = {
            let keep = end_to_end(headers);
            headers.keys().filter(|n| !keep(n)).cloned().collect()
        };
        for name in dropped {
            headers.remove(name);
        }
        headers.insert(HeaderName::from_static(IDEMPOTENCY_KEY_HEADER), key);
        Ok(req)
    }

    impl<B> RequestCodec<Request<BufferedBody<B>>> for HttpCodec {
        fn idempotency_key(&self, req: &Request<BufferedBody<B>>) -> Option<String> {
            key_of(req.headers())
        }

        fn set_idempotency_key(&self, req: &mut Request<BufferedBody<B>>, key: &str) {
            // A header that already reads as `key` stays as it was spelt (quoted or
            // bare): rewritten bare, `"a\"b"` would be another key at the receiver.
            if key_of(req.headers()).as_deref() == Some(key) {
                keep_first_key(req.headers_mut());
            } else {
                set_key(req.headers_mut(), key);
            }
        }

        fn capture(&self, req: &Request<BufferedBody<B>>) -> Option<Captured> {
            if opens_a_connection(req.method(), req.headers()) || has_unreadable_key(req.headers())
            {
                return None;
            }
            let body = req.body().as_bytes()?.clone();
            Some(capture_head(req.method(), req.uri(), req.headers(), body))
        }

        fn rebuild(&self, envelope: &Envelope) -> Result<Request<BufferedBody<B>>, BoxError> {
            rebuild_request(envelope)
        }

        fn attempt_log(
            &self,
            req: &mut Request<BufferedBody<B>>,
        ) -> Option<crate::retry::AttemptLog> {
            let log = crate::retry::AttemptLog::new();
            req.extensions_mut().insert(log.clone());
            Some(log)
        }
    }

    /// A request's destination: its authority as the per-host breaker keys it (one for
    /// `api.test`, `API.test` and `http://api.test:80`), so the replayer holds back every
    /// spelling of a host whose breaker is open, not only the one that met it. Without
    /// userinfo: the destination goes into broker headers any consumer reads, and into
    /// logs; the credentials stay in the URI, for the replay.
    pub(super) fn destination_of(uri: &Uri, headers: &HeaderMap) -> String {
        let d = crate::http::host_of(uri, headers)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let default_port = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("https") => 443,
            Some(s) if s.eq_ignore_ascii_case("http") => 80,
            _ => return d,
        };
        // The port read as a number, as the breaker's key does (`:080` is `:80`).
        match d.parse::<http::uri::Authority>() {
            Ok(a) if a.port_u16() == Some(default_port) => a.host().to_owned(),
            _ => d,
        }
    }
}

#[cfg(all(test, feature = "http"))]
mod tests {
    use super::http_codec::{destination_of, rebuild_request};
    use crate::queue::{DeferReason, Envelope};
    use bytes::Bytes;
    use http::HeaderMap;

    /// Every spelling of one host is one destination, as the per-host breaker keys it:
    /// case and the scheme's default port do not count, another port does. (Each
    /// spelling was a destination of its own, and the replayer paused only the one
    /// that met the open breaker.)
    #[test]
    fn a_destination_is_the_authority_the_breaker_keys() {
        let of = |uri: &str, host: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(h) = host {
                headers.insert(http::header::HOST, h.parse().unwrap());
            }
            destination_of(&uri.parse().unwrap(), &headers)
        };
        assert_eq!(of("http://api.test/x", None), "api.test");
        assert_eq!(of("http://API.Test/x", None), "api.test");
        assert_eq!(of("http://api.test:80/x", None), "api.test");
        assert_eq!(of("https://api.test:443/x", None), "api.test");
        assert_eq!(of("http://api.test:443/x", None), "api.test:443");
        assert_eq!(of("https://api.test:8443/x", None), "api.test:8443");
        assert_eq!(of("http://u:pw@[::1]:80/x", None), "[::1]");
        assert_eq!(of("http://api.test:080/x", None), "api.test");
        assert_eq!(
            of("/x", Some("API.test:80")),
            "api.test:80",
            "no scheme: the port stays"
        );
    }

    /// A dead letter whose replays went out under its message id (its key blank, or one
    /// no header can carry) is redriven under that same key, not the copy's new id: a
    /// receiver that took an earlier replay (its answer lost) would run it again. A
    /// usable key is kept as it is.
    #[test]
    fn a_redrive_sends_the_key_the_replays_were_sent_with() {
        let key_sent = |env: &Envelope| {
            rebuild_request::<http_body_util::Empty<Bytes>>(env)
                .unwrap()
                .headers()["idempotency-key"]
                .clone()
        };
        for key in ["", "  ", "a\nb", "order-7"] {
            let mut env = Envelope::new(
                "api:443",
                "POST",
                "https://api/orders",
                "{}",
                DeferReason::CircuitOpen,
            );
            env.idempotency_key = key.into();
            let first = key_sent(&env);
            let redriven = env.clone().redriven();
            assert_ne!(redriven.id, env.id);
            assert_eq!(key_sent(&redriven), first, "key {key:?}");
            assert_eq!(key_sent(&redriven.redriven()), first, "key {key:?}, twice");
        }
    }

    /// A replayed request is marked as held whole: a retry in the replay's stack keeps
    /// it whatever that stack's buffer limit (a larger replay was sent once).
    #[test]
    fn a_rebuilt_request_is_held_whole() {
        let env = Envelope::new(
            "api:443",
            "POST",
            "http://api/orders",
            Bytes::from(vec![b'x'; 4096]),
            DeferReason::RetriesExhausted,
        );
        let req = rebuild_request::<http_body_util::Empty<Bytes>>(&env).unwrap();
        assert!(matches!(
            req.extensions().get::<crate::http::body::HeldWhole>(),
            Some(crate::http::body::HeldWhole(4096))
        ));
    }

    /// An envelope with more header fields than a header map holds (another producer's,
    /// a damaged queue file) is an error to rebuild, not a panic, and so is one that
    /// would fill the map to the brim (the idempotency key, then any layer of the
    /// replay, inserted into it panicked).
    #[test]
    fn an_envelope_with_too_many_header_fields_is_an_error_not_a_panic() {
        for fields in [24_575usize, 24_600, 8193] {
            let mut env =
                Envelope::new("api", "POST", "http://api/x", "", DeferReason::CircuitOpen);
            env.headers = (0..fields)
                .map(|i| (format!("h{i}"), Bytes::from_static(b"v")))
                .collect();
            let rebuilt = rebuild_request::<http_body_util::Empty<Bytes>>(&env);
            assert!(rebuilt.is_err(), "{fields} fields");
        }
        let mut env = Envelope::new("api", "POST", "http://api/x", "", DeferReason::CircuitOpen);
        env.headers = (0..100)
            .map(|i| (format!("h{i}"), Bytes::from_static(b"v")))
            .collect();
        assert!(rebuild_request::<http_body_util::Empty<Bytes>>(&env).is_ok());
    }
}
