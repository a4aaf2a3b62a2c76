//! The `Idempotency-Key` header: reading it, generating one, and the HTTP methods that
//! are idempotent without one.
//!
//! A request carrying an `Idempotency-Key` may be sent more than once: the receiving
//! service de-duplicates on the key (draft-ietf-httpapi-idempotency-key-header). The
//! retry layer retries such requests whatever their method, and can add a key to a
//! non-idempotent request before its first attempt so that it becomes retryable; the
//! enqueue fallback uses the same key when it replays the request later.
//!
//! # Example
//! ```
//! use postbox::http::idempotency_key::{IDEMPOTENCY_KEY, ensure_idempotency_key};
//!
//! let mut req = http::Request::post("http://example.com/orders").body(()).unwrap();
//! let key = ensure_idempotency_key(&mut req);
//! assert_eq!(req.headers()[IDEMPOTENCY_KEY], key);
//! // A second call keeps the key the request already has.
//! assert_eq!(ensure_idempotency_key(&mut req), key);
//! ```

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};

/// The `Idempotency-Key` request header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// `true` for the methods RFC 9110 defines as idempotent: `GET`, `HEAD`, `OPTIONS`,
/// `TRACE` (safe), `PUT` and `DELETE`.
pub fn is_idempotent_method(method: &Method) -> bool {
    is_safe_method(method) || matches!(*method, Method::PUT | Method::DELETE)
}

/// `true` for the methods RFC 9110 §9.2.1 defines as safe: `GET`, `HEAD`, `OPTIONS`,
/// `TRACE`.
pub(crate) fn is_safe_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// The key a header value carries, as the server's
/// [`Idempotency`](crate::idempotency::Idempotency) layer reads it: visible ASCII (and
/// spaces), without surrounding whitespace, not blank. Any other value is no key: a request
/// counted as retry-safe for it would not be de-duplicated by the server.
///
/// The IETF draft defines the header as a structured-field string (RFC 8941 §3.3.3):
/// `Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`; most clients send the
/// key bare (`Idempotency-Key: 8e03978e-…`). Both are read, and are the same key: a
/// well-formed quoted string is read without its quotes and escapes (and without
/// parameters after it, which the draft defines none of), anything else as it stands.
/// So a retry that re-sends a key in the other form is still a duplicate.
pub fn key_in(value: &HeaderValue) -> Option<Cow<'_, str>> {
    let text = value.to_str().ok()?.trim();
    let key = match sf_string(text) {
        Some(unquoted) => unquoted,
        None => Cow::Borrowed(text),
    };
    (!key.trim().is_empty()).then_some(key)
}

/// The content of `text` if it is a structured-field string item (RFC 8941 §4.2.5),
/// else `None`. Whatever follows the closing quote after a `;` is taken for parameters
/// and ignored unchecked (the draft defines none).
fn sf_string(text: &str) -> Option<Cow<'_, str>> {
    let body = text.strip_prefix('"')?;
    let mut escaped = false;
    let mut unescaped: Option<String> = None;
    for (i, c) in body.char_indices() {
        if escaped {
            if c != '"' && c != '\\' {
                return None;
            }
            escaped = false;
            unescaped
                .get_or_insert_with(|| body[..i - 1].to_owned())
                .push(c);
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' => {
                let rest = &body[i + 1..];
                if !rest.is_empty() && !rest.starts_with(';') {
                    return None;
                }
                return Some(unescaped.map_or(Cow::Borrowed(&body[..i]), Cow::Owned));
            }
            ' '..='~' => {
                if let Some(s) = unescaped.as_mut() {
                    s.push(c);
                }
            }
            _ => return None,
        }
    }
    None
}

/// `true` if the headers carry a usable `Idempotency-Key` (see [`key_in`]).
pub fn has_idempotency_key(headers: &HeaderMap) -> bool {
    headers.get(IDEMPOTENCY_KEY).and_then(key_in).is_some()
}

/// `true` if a request with this method and these headers may be sent more than once:
/// an idempotent method, or an `Idempotency-Key`.
pub fn is_retry_safe(method: &Method, headers: &HeaderMap) -> bool {
    is_idempotent_method(method) || has_idempotency_key(headers)
}

/// A new key: a UUIDv7 in lowercase hyphenated form (48-bit Unix milliseconds, then 74
/// bits fresh for every key), so keys sort by creation time and never repeat in
/// practice.
///
/// The 74 bits cannot be worked out from other keys: they are a keyed hash (SipHash,
/// its keys from the operating system's randomness, once per process) of a counter.
/// Message ids ([`MessageId::new_v7`](crate::queue::MessageId::new_v7)) count up within
/// a millisecond; keys made so, a caller shown its own key (a receipt's
/// `idempotency-key`) could take the next ones first at a server that scopes keys by
/// route alone, and have other callers' requests answered `409` or `422`.
pub fn generate_idempotency_key() -> HeaderValue {
    let text = crate::queue::MessageId::new_key_v7().hyphenated();
    HeaderValue::from_bytes(&text).expect("hex digits and hyphens are a valid header value")
}

/// The request's `Idempotency-Key`, adding a [generated](generate_idempotency_key) one
/// first if it has none, or only blank ones.
///
/// A key that is not ASCII (see [`key_in`]) is left as it is, and returned: the
/// request stays not retry-safe, as the enqueue layer leaves it. Replaced, the
/// caller's own retry of the call went out under another generated key, and a server
/// comparing raw bytes took it for another request.
pub fn ensure_idempotency_key<B>(req: &mut Request<B>) -> HeaderValue {
    if let Some(v) = req
        .headers()
        .get(IDEMPOTENCY_KEY)
        .filter(|v| key_in(v).is_some())
    {
        return v.clone();
    }
    if let Some(v) = req
        .headers()
        .get_all(IDEMPOTENCY_KEY)
        .iter()
        .find(|v| v.to_str().is_err())
    {
        return v.clone();
    }
    let key = generate_idempotency_key();
    req.headers_mut().insert(IDEMPOTENCY_KEY, key.clone());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generated keys are UUIDv7s of the current millisecond whose other bits share
    /// nothing with the key before: message ids made in the same millisecond differ by
    /// one, and keys made so could be guessed from a key a caller was shown.
    #[test]
    fn generated_keys_are_v7_and_not_guessable_from_the_one_before() {
        let keys: Vec<u128> = (0..1000)
            .map(|_| {
                let text = generate_idempotency_key();
                let id: crate::queue::MessageId = text.to_str().unwrap().parse().unwrap();
                assert_eq!(text.to_str().unwrap().as_bytes()[14], b'7', "{text:?}");
                u128::from_be_bytes(*id.as_bytes())
            })
            .collect();
        let random = |k: u128| k & ((1 << 62) - 1);
        for pair in keys.windows(2) {
            let apart = random(pair[0]).abs_diff(random(pair[1]));
            assert!(apart > 1 << 32, "{:032x} then {:032x}", pair[0], pair[1]);
        }
    }

    /// A key the server's `Idempotency` layer cannot read (blank, not ASCII) does not
    /// make a request retry-safe: retried, a `POST` with it was applied twice, the server
    /// passing it through undeduplicated. A blank one is replaced by a generated one (a
    /// key that is not ASCII is kept: see the next test).
    #[test]
    fn a_blank_or_non_ascii_key_is_not_retry_safe() {
        for bad in [&b"   "[..], "cmd-\u{e9}1".as_bytes(), b""] {
            let mut req = Request::post("/orders").body(()).unwrap();
            req.headers_mut()
                .insert(IDEMPOTENCY_KEY, HeaderValue::from_bytes(bad).unwrap());
            assert!(!is_retry_safe(req.method(), req.headers()), "{bad:?}");
        }
        // A blank key is replaced by a generated one.
        for blank in [&b"   "[..], b""] {
            let mut req = Request::post("/orders").body(()).unwrap();
            req.headers_mut()
                .insert(IDEMPOTENCY_KEY, HeaderValue::from_bytes(blank).unwrap());
            let key = ensure_idempotency_key(&mut req);
            assert_eq!(key.len(), 36, "{blank:?} kept");
            assert_eq!(req.headers()[IDEMPOTENCY_KEY], key);
        }
        let mut req = Request::post("/orders").body(()).unwrap();
        req.headers_mut()
            .insert(IDEMPOTENCY_KEY, HeaderValue::from_static("order-7"));
        assert!(is_retry_safe(req.method(), req.headers()));
        assert_eq!(ensure_idempotency_key(&mut req), "order-7");
    }

    /// A key that is not ASCII is left as the caller sent it, not replaced by a
    /// generated one: the caller's own retry sends the same bytes, and a server comparing
    /// them must see the same key. The request stays not retry-safe. (It was replaced,
    /// and each retry of the caller's went out under another key.)
    #[test]
    fn a_non_ascii_key_is_kept_not_replaced() {
        let mut req = Request::post("/orders").body(()).unwrap();
        let own = HeaderValue::from_bytes("cmd-\u{e9}1".as_bytes()).unwrap();
        req.headers_mut().insert(IDEMPOTENCY_KEY, own.clone());
        assert_eq!(ensure_idempotency_key(&mut req), own);
        assert_eq!(req.headers().get_all(IDEMPOTENCY_KEY).iter().count(), 1);
        assert_eq!(req.headers()[IDEMPOTENCY_KEY], own);
        assert!(!is_retry_safe(req.method(), req.headers()));
    }

    /// The draft's structured-field string and the bare key are the same key; what is
    /// not a well-formed string is read as it stands.
    #[test]
    fn a_quoted_key_is_read_without_its_quotes_and_escapes() {
        let read = |v: &'static str| key_in(&HeaderValue::from_static(v)).map(Cow::into_owned);
        assert_eq!(read("\"k-1\"").as_deref(), Some("k-1"));
        assert!(matches!(
            key_in(&HeaderValue::from_static("\"k-1\"")),
            Some(Cow::Borrowed(_))
        ));
        assert_eq!(read("  \"k-1\";a=1 ").as_deref(), Some("k-1"));
        assert_eq!(read(r#""a\"b\\c""#).as_deref(), Some(r#"a"b\c"#));
        assert_eq!(read("k-1").as_deref(), Some("k-1"));
        // Not strings: kept whole.
        assert_eq!(read(r#""a\qb""#).as_deref(), Some(r#""a\qb""#));
        assert_eq!(read(r#""open"#).as_deref(), Some(r#""open"#));
        assert_eq!(read(r#""a" b"#).as_deref(), Some(r#""a" b"#));
        // Blank inside the quotes is no key.
        assert_eq!(read(r#""""#), None);
        assert_eq!(read(r#""  ""#), None);
    }

    #[test]
    fn generated_keys_are_uuid_v7() {
        let a = generate_idempotency_key();
        let b = generate_idempotency_key();
        assert_ne!(a, b);
        let s = a.to_str().unwrap();
        assert_eq!(s.len(), 36);
        let parts: Vec<_> = s.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12]);
        assert_eq!(&s[14..15], "7");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn safe_methods_and_keyed_requests_are_retry_safe() {
        let empty = HeaderMap::new();
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(is_retry_safe(&m, &empty), "{m}");
        }
        assert!(!is_retry_safe(&Method::POST, &empty));
        assert!(!is_retry_safe(&Method::PATCH, &empty));
        let mut keyed = HeaderMap::new();
        keyed.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("k1"));
        assert!(is_retry_safe(&Method::POST, &keyed));
        keyed.insert(IDEMPOTENCY_KEY, HeaderValue::from_static(""));
        assert!(
            !is_retry_safe(&Method::POST, &keyed),
            "an empty key is no key"
        );
    }
}
