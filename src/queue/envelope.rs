//! The envelope: a deferred request and everything needed to replay it.
//!
//! The binary encoding (`Envelope::encode` / `Envelope::decode`) is versioned and
//! documented in `docs/envelope.md` for consumers in other languages.

use bytes::Bytes;
use std::fmt;
use std::time::SystemTime;

/// A message id: a UUIDv7 (48-bit Unix-millisecond timestamp, then random bits), so
/// ids sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub [u8; 16]);

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl fmt::Display for MessageId {
    /// Hyphenated lowercase UUID form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.hyphenated();
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl MessageId {
    /// The hyphenated lowercase UUID form (`0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b`) as
    /// ASCII bytes, without allocating.
    pub fn hyphenated(&self) -> [u8; 36] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 36];
        let mut i = 0;
        for (n, byte) in self.0.iter().enumerate() {
            if matches!(n, 4 | 6 | 8 | 10) {
                out[i] = b'-';
                i += 1;
            }
            out[i] = HEX[usize::from(byte >> 4)];
            out[i + 1] = HEX[usize::from(byte & 0x0f)];
            i += 2;
        }
        out
    }
}

/// Why a request was deferred instead of answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeferReason {
    /// The circuit breaker was open.
    CircuitOpen,
    /// The bulkhead was full.
    BulkheadFull,
    /// Every retry failed with a retryable failure.
    RetriesExhausted,
    /// The deadline elapsed.
    DeadlineElapsed,
}

/// A deferred request.
///
/// Its `Debug` output shows the body's length and the header names, with the values
/// of credential headers (`authorization`, `cookie`, and any whose name has `auth`,
/// `token`, `secret`, `passw`, `api-key`, `api_key`, `apikey`, `subscription-key`,
/// `functions-key`, `session`, `signature`, `credential`, `dpop` or `csrf` in it)
/// redacted: dead letters get logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Time-ordered id.
    pub id: MessageId,
    /// The key the receiving service de-duplicates on (also sent on the original
    /// attempt).
    pub idempotency_key: String,
    /// When the request was first made.
    pub created_at: SystemTime,
    /// Not to be delivered before this (from `Retry-After` or the breaker).
    pub not_before: SystemTime,
    /// Given up (dead-lettered) after this, if set.
    pub expires_at: Option<SystemTime>,
    /// Delivery attempts so far (leases).
    pub attempts: u32,
    /// Logical destination (for HTTP, the request's authority as the per-host breaker
    /// keys it: `api:8080`, or `api` for `http://API:80`; in lower case, without
    /// userinfo or the scheme's default port).
    pub destination: String,
    /// Request method (`POST`; for non-HTTP requests, a codec-defined verb).
    pub method: String,
    /// Request URI (absolute for HTTP clients).
    pub uri: String,
    /// Request headers, in order; values are raw bytes.
    pub headers: Vec<(String, Bytes)>,
    /// Request body.
    pub body: Bytes,
    /// Why it was deferred.
    pub reason: DeferReason,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("idempotency_key", &self.idempotency_key)
            .field("created_at", &self.created_at)
            .field("not_before", &self.not_before)
            .field("expires_at", &self.expires_at)
            .field("attempts", &self.attempts)
            .field("destination", &self.destination)
            .field("method", &self.method)
            .field("uri", &RedactedUri(&self.uri))
            .field("headers", &RedactedHeaders(&self.headers))
            .field("body", &BodyLen(self.body.len()))
            .field("reason", &self.reason)
            .finish()
    }
}

/// Header names holding credentials: `Debug` output never shows their values, and a
/// replayed request gets them back marked sensitive (a stored value loses the flag).
const CREDENTIALS: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
];

/// Words that make a header name look like a credential's (`x-auth-token`,
/// `x-amz-security-token`, `x-goog-api-key`, `ocp-apim-subscription-key`,
/// `x-functions-key`, `x-session-id`, `x-client-secret`, `dpop`): the
/// flag a caller set with `HeaderValue::set_sensitive` is not stored, so names are all
/// there is to go by; redacting one too many in a log costs nothing.
const CREDENTIAL_WORDS: [&str; 14] = [
    "auth",
    "token",
    "secret",
    "passw",
    "api-key",
    "api_key",
    "apikey",
    "subscription-key",
    "functions-key",
    "session",
    "signature",
    "credential",
    "dpop",
    "csrf",
];

/// Whether the header `name` holds a credential (any case): one of [`CREDENTIALS`],
/// or a name with one of [`CREDENTIAL_WORDS`] in it.
pub(crate) fn is_credential(name: &str) -> bool {
    CREDENTIALS.iter().any(|c| name.eq_ignore_ascii_case(c))
        || CREDENTIAL_WORDS.iter().any(|w| {
            name.as_bytes()
                .windows(w.len())
                .any(|part| part.eq_ignore_ascii_case(w.as_bytes()))
        })
}

/// A URI for `Debug`: its userinfo (`user:password@`) redacted, and the values of
/// query parameters named like credentials ([`is_credential`], or `sig`, `key`,
/// `code`, `pwd`, `jwt`, `pass`, the name read with its `%XX` escapes decoded:
/// `?access_token=`, `X-Amz-Signature=`, a Maps `key=`).
pub(crate) struct RedactedUri<'a>(pub(crate) &'a str);

impl fmt::Debug for RedactedUri<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let uri = self.0;
        // A scheme-relative `//user:pw@host/…` (a foreign producer's) has an authority too.
        // A `://` after a `/`, `?` or `#` is in a path or query (`/cb?next=https://…`),
        // not a scheme's.
        let scheme = uri
            .find("://")
            .filter(|&i| !uri[..i].contains(['/', '?', '#']));
        let start = match scheme {
            Some(i) => i + 3,
            None if uri.starts_with("//") => 2,
            None => 0,
        };
        let end = uri[start..]
            .find(['/', '?', '#'])
            .map_or(uri.len(), |i| start + i);
        let mut shown = String::with_capacity(uri.len());
        let rest = match uri[start..end].rfind('@') {
            Some(at) => {
                shown.push_str(&uri[..start]);
                shown.push_str("<redacted>@");
                &uri[start + at + 1..]
            }
            None => uri,
        };
        // The fragment first: `#access_token=…` (an OAuth implicit-flow callback) is
        // redacted as a query is.
        let (rest, fragment) = match rest.find('#') {
            Some(h) => (&rest[..h], Some(&rest[h + 1..])),
            None => (rest, None),
        };
        let (before, query) = match rest.find('?') {
            Some(q) => (&rest[..q], Some(&rest[q + 1..])),
            None => (rest, None),
        };
        shown.push_str(before);
        if let Some(query) = query {
            shown.push('?');
            redact_query(query, "<redacted>", &mut shown);
        }
        if let Some(fragment) = fragment {
            shown.push('#');
            redact_query(fragment, "<redacted>", &mut shown);
        }
        fmt::Debug::fmt(&shown, f)
    }
}

/// Writes `query` (without its `?`) to `out`, the values of parameters named like
/// credentials ([`is_secret_param`]) replaced with `with`. Parameters are separated by
/// `&` or `;` (the older form some servers still read); a `;` followed by no `=` before
/// the next separator is read as part of the value before it (`password=ab;cd` is
/// redacted whole).
pub(crate) fn redact_query(query: &str, with: &str, out: &mut String) {
    let mut rest = query;
    // The separator before `rest`, and whether the parameter before it is redacted.
    let (mut sep, mut secret) = (None, false);
    loop {
        let (part, next) = match rest.find(['&', ';']) {
            Some(i) => (&rest[..i], Some(i)),
            None => (rest, None),
        };
        if sep == Some(';') && !part.contains('=') {
            // More of the value before.
            if !secret {
                out.push(';');
                out.push_str(part);
            }
        } else {
            if let Some(c) = sep {
                out.push(c);
            }
            match part.split_once('=') {
                Some((name, _)) if is_secret_param(name) => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(with);
                    secret = true;
                }
                _ => {
                    out.push_str(part);
                    secret = false;
                }
            }
        }
        let Some(i) = next else { break };
        sep = Some(char::from(rest.as_bytes()[i]));
        rest = &rest[i + 1..];
    }
}

/// Whether the query parameter `name` holds a credential (its `%XX` escapes read:
/// `api%5Fkey` is `api_key`).
pub(crate) fn is_secret_param(name: &str) -> bool {
    const SHORT: [&str; 6] = ["sig", "key", "code", "pwd", "jwt", "pass"];
    let name = percent_decoded(name);
    // Any name ending in `key` (`access_key`, `private_key`, `clientKey`): a `monkey`
    // redacted too costs nothing in a log.
    let ends_in_key =
        name.len() >= 3 && name.as_bytes()[name.len() - 3..].eq_ignore_ascii_case(b"key");
    is_credential(&name) || ends_in_key || SHORT.iter().any(|s| name.eq_ignore_ascii_case(s))
}

/// `text` with its `%XX` escapes decoded (bytes that are not UTF-8 replaced).
pub(crate) fn percent_decoded(text: &str) -> String {
    if !text.contains('%') {
        return text.to_owned();
    }
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |j: usize| bytes.get(j).and_then(|&b| char::from(b).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                decoded.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Headers for `Debug`: credential values redacted, other values as text.
pub(crate) struct RedactedHeaders<'a>(pub(crate) &'a [(String, Bytes)]);

impl fmt::Debug for RedactedHeaders<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for (name, value) in self.0 {
            if is_credential(name) {
                list.entry(&(name, "<redacted>"));
            } else {
                list.entry(&(name, String::from_utf8_lossy(value)));
            }
        }
        list.finish()
    }
}

/// A body for `Debug`: its length only.
pub(crate) struct BodyLen(pub(crate) usize);

impl fmt::Debug for BodyLen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

/// An envelope could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// Input ended before the envelope did.
    Truncated,
    /// Not an envelope (bad magic).
    BadMagic,
    /// A format version this build does not know.
    UnknownVersion(u8),
    /// A field has an invalid value.
    Invalid(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("envelope truncated"),
            DecodeError::BadMagic => f.write_str("not a postbox envelope (bad magic)"),
            DecodeError::UnknownVersion(v) => write!(f, "unknown envelope version {v}"),
            DecodeError::Invalid(field) => write!(f, "invalid envelope field `{field}`"),
        }
    }
}

impl std::error::Error for DecodeError {}

// === impl MessageId ===

/// The last id handed out by [`MessageId::new_v7`], to keep ids monotonic within a
/// process: `(unix_ms, 74 counter bits)`.
static LAST_V7: std::sync::Mutex<(u64, u128)> = std::sync::Mutex::new((0, 0));

/// Mask of the 74 bits of a UUIDv7 that are not timestamp, version or variant.
const V7_RAND_BITS: u32 = 74;

impl MessageId {
    /// A new UUIDv7 from the system clock's Unix milliseconds and random bits.
    ///
    /// Ids are strictly increasing within a process (RFC 9562 §6.2, method 2: within one
    /// millisecond, or if the clock steps back, the 74 random bits are used as a counter
    /// started at a random value), so they sort by creation order.
    pub fn new_v7() -> Self {
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
            & 0xFFFF_FFFF_FFFF; // 48 bits
        // Random start with the top bit clear, leaving room to count up within a ms.
        let fresh = || fastrand::u128(..) & ((1u128 << (V7_RAND_BITS - 1)) - 1);
        let (ms, counter) = {
            // A poisoned lock only means another thread panicked while holding a plain
            // pair of integers; the value is still usable.
            let mut last = LAST_V7.lock().unwrap_or_else(|e| e.into_inner());
            let next = if now_ms > last.0 {
                (now_ms, fresh())
            } else if last.1 + 1 < (1u128 << V7_RAND_BITS) {
                (last.0, last.1 + 1)
            } else {
                // Counter exhausted within one millisecond: borrow the next one.
                (last.0 + 1, fresh())
            };
            *last = next;
            next
        };
        Self::from_v7_parts(ms, counter)
    }

    /// A new UUIDv7 for an idempotency key: the system clock's Unix milliseconds, then
    /// 74 bits that cannot be worked out from other keys: a keyed hash (SipHash, its
    /// keys from the operating system's randomness, once per process) of a counter.
    /// ([`new_v7`](Self::new_v7) counts up within a millisecond: keys made so could be
    /// guessed from one a caller was shown, a receipt's `idempotency-key`.)
    pub(crate) fn new_key_v7() -> Self {
        use std::hash::BuildHasher;
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static SECRET: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let secret = SECRET.get_or_init(std::collections::hash_map::RandomState::new);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let bits =
            (u128::from(secret.hash_one((n, 0u8))) << 64) | u128::from(secret.hash_one((n, 1u8)));
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self::from_v7_parts(ms, bits)
    }

    /// Assembles a UUIDv7 from a 48-bit millisecond timestamp and 74 random/counter bits.
    fn from_v7_parts(ms: u64, bits74: u128) -> Self {
        let rand_a = (bits74 >> 62) & 0xFFF; // 12 bits
        let rand_b = bits74 & ((1u128 << 62) - 1); // 62 bits
        let v = (u128::from(ms & 0xFFFF_FFFF_FFFF) << 80)
            | (0x7u128 << 76)
            | (rand_a << 64)
            | (0b10u128 << 62)
            | rand_b;
        MessageId(v.to_be_bytes())
    }

    /// The id from its 16 bytes (big-endian, as in the UUID text form).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        MessageId(bytes)
    }

    /// The id's 16 bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The Unix-millisecond timestamp of a UUIDv7 id (its first 48 bits).
    pub fn timestamp_ms(&self) -> u64 {
        let mut b = [0u8; 8];
        b[2..].copy_from_slice(&self.0[..6]);
        u64::from_be_bytes(b)
    }
}

impl std::str::FromStr for MessageId {
    type Err = DecodeError;

    /// Parses the hyphenated (`01890a5d-ac96-774b-bcce-b302099a8057`) or plain 32-digit
    /// hex form, in either case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex: Vec<u8> = if s.len() == 36 {
            for (i, c) in s.bytes().enumerate() {
                if matches!(i, 8 | 13 | 18 | 23) != (c == b'-') {
                    return Err(DecodeError::Invalid("message id"));
                }
            }
            s.bytes().filter(|&c| c != b'-').collect()
        } else {
            s.bytes().collect()
        };
        if hex.len() != 32 {
            return Err(DecodeError::Invalid("message id"));
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(DecodeError::Invalid("message id")),
        };
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Ok(MessageId(out))
    }
}

// === impl DeferReason ===

impl DeferReason {
    /// The reason's code in the binary encoding.
    pub const fn code(self) -> u8 {
        match self {
            DeferReason::CircuitOpen => 1,
            DeferReason::BulkheadFull => 2,
            DeferReason::RetriesExhausted => 3,
            DeferReason::DeadlineElapsed => 4,
        }
    }

    /// The reason for an encoding code, if it is one.
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(DeferReason::CircuitOpen),
            2 => Some(DeferReason::BulkheadFull),
            3 => Some(DeferReason::RetriesExhausted),
            4 => Some(DeferReason::DeadlineElapsed),
            _ => None,
        }
    }
}

// === impl Envelope ===

/// The first four bytes of every encoded envelope.
pub const MAGIC: [u8; 4] = *b"PBOX";
/// The encoding version [`Envelope::encode`] writes (and the only one
/// [`Envelope::decode`] reads).
pub const VERSION: u8 = 1;
/// Size of the fixed-layout header of version 1, in bytes.
const FIXED_LEN: usize = 64;
/// Flag bit: `expires_at` is present.
const FLAG_EXPIRES: u8 = 0b0000_0001;

impl Envelope {
    /// A new envelope for a request deferred now: a fresh [`MessageId::new_v7`], a
    /// fresh idempotency key (a UUIDv7 of its own, which cannot be worked out from
    /// the id or from other keys, unlike the ids of one millisecond, which count up),
    /// `created_at` and `not_before` now, no expiry, no attempts, no headers.
    pub fn new(
        destination: impl Into<String>,
        method: impl Into<String>,
        uri: impl Into<String>,
        body: impl Into<Bytes>,
        reason: DeferReason,
    ) -> Self {
        let id = MessageId::new_v7();
        let now = SystemTime::now();
        Envelope {
            id,
            idempotency_key: MessageId::new_key_v7().to_string(),
            created_at: now,
            not_before: now,
            expires_at: None,
            attempts: 0,
            destination: destination.into(),
            method: method.into(),
            uri: uri.into(),
            headers: Vec::new(),
            body: body.into(),
            reason,
        }
    }

    /// A copy to enqueue again after it was dead-lettered (see
    /// [`Queue::redrive_dead_letters`](super::Queue::redrive_dead_letters)): a fresh
    /// [`MessageId::new_v7`] (so it is queued behind what is pending now), no attempts,
    /// and everything else kept — the idempotency key, so the effect still happens at
    /// most once; the not-before, so it is due at once; and the expiry, so a message
    /// past it dies again instead of being sent late. A message whose replays went out
    /// under its id (its key blank, from another producer, or one no HTTP header can
    /// carry) gets that id as its key: sent under the copy's new id, a receiver that
    /// took an earlier replay would run it again.
    #[must_use]
    pub fn redriven(self) -> Self {
        #[cfg(feature = "http")]
        let keyed_by_id = crate::enqueue::codec::http_codec::key_header(&self).is_none();
        #[cfg(not(feature = "http"))]
        let keyed_by_id = !crate::enqueue::usable_key(&self.idempotency_key);
        let idempotency_key = if keyed_by_id {
            self.id.to_string()
        } else {
            self.idempotency_key
        };
        Envelope {
            id: MessageId::new_v7(),
            attempts: 0,
            idempotency_key,
            ..self
        }
    }

    /// The length of [`encode`](Self::encode)'s output, without encoding.
    pub fn encoded_len(&self) -> usize {
        let var_len = 4 * 6
            + self.idempotency_key.len()
            + self.destination.len()
            + self.method.len()
            + self.uri.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| 8 + n.len() + v.len())
                .sum::<usize>()
            + self.body.len();
        FIXED_LEN + var_len
    }

    /// Whether the envelope can be encoded: every string, header value and the body
    /// under 4 GiB, and at most `u32::MAX` headers (lengths are 32-bit). The queues
    /// check it before [`encode`](Self::encode), which panics otherwise.
    ///
    /// # Errors
    /// [`QueueError::Backend`](super::QueueError::Backend) naming the field too large.
    pub fn check_encodable(&self) -> Result<(), super::QueueError> {
        let max = u32::MAX as usize;
        let too_large = |what: &str, len: usize| {
            super::QueueError::Backend(
                format!("envelope {what} of {len} bytes: the format holds at most {max}").into(),
            )
        };
        for (what, len) in [
            ("idempotency key", self.idempotency_key.len()),
            ("destination", self.destination.len()),
            ("method", self.method.len()),
            ("uri", self.uri.len()),
            ("body", self.body.len()),
        ] {
            if len > max {
                return Err(too_large(what, len));
            }
        }
        if self.headers.len() > max {
            return Err(too_large("header count", self.headers.len()));
        }
        if let Some((n, v)) = self
            .headers
            .iter()
            .find(|(n, v)| n.len() > max || v.len() > max)
        {
            return Err(too_large("header", n.len().max(v.len())));
        }
        Ok(())
    }

    /// Encodes the envelope in the versioned binary format described in
    /// `docs/envelope.md` (little-endian; a 64-byte fixed header, then length-prefixed
    /// fields).
    ///
    /// # Panics
    /// If a single string, header value or the body is 4 GiB or larger, or there are
    /// more than `u32::MAX` headers (lengths are 32-bit).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.reason.code());
        out.push(if self.expires_at.is_some() {
            FLAG_EXPIRES
        } else {
            0
        });
        out.push(0); // reserved
        out.extend_from_slice(&self.id.0);
        put_time(&mut out, self.created_at);
        put_time(&mut out, self.not_before);
        match self.expires_at {
            Some(t) => put_time(&mut out, t),
            None => out.extend_from_slice(&[0u8; 12]),
        }
        out.extend_from_slice(&self.attempts.to_le_bytes());
        debug_assert_eq!(out.len(), FIXED_LEN);
        put_bytes(&mut out, self.idempotency_key.as_bytes());
        put_bytes(&mut out, self.destination.as_bytes());
        put_bytes(&mut out, self.method.as_bytes());
        put_bytes(&mut out, self.uri.as_bytes());
        put_u32(&mut out, self.headers.len());
        for (name, value) in &self.headers {
            put_bytes(&mut out, name.as_bytes());
            put_bytes(&mut out, value);
        }
        put_bytes(&mut out, &self.body);
        out
    }

    /// Decodes an envelope written by [`Envelope::encode`].
    ///
    /// # Errors
    /// [`DecodeError::BadMagic`] if the input is not an envelope,
    /// [`DecodeError::UnknownVersion`] for a version other than [`VERSION`],
    /// [`DecodeError::Truncated`] if it ends early, and [`DecodeError::Invalid`] naming the
    /// field for an invalid value (unknown reason code, unknown flags, a non-UTF-8
    /// string, an out-of-range timestamp) or trailing bytes. Never panics.
    pub fn decode(input: &[u8]) -> Result<Envelope, DecodeError> {
        let mut r = Reader { buf: input };
        // Check the magic and version before length, so a short foreign input says
        // what it is rather than "truncated".
        let magic = r.take(4.min(input.len()))?;
        if magic != &MAGIC[..magic.len()] {
            return Err(DecodeError::BadMagic);
        }
        if magic.len() < 4 {
            return Err(DecodeError::Truncated);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let reason = DeferReason::from_code(r.u8()?).ok_or(DecodeError::Invalid("reason"))?;
        let flags = r.u8()?;
        if flags & !FLAG_EXPIRES != 0 {
            return Err(DecodeError::Invalid("flags"));
        }
        if r.u8()? != 0 {
            return Err(DecodeError::Invalid("reserved"));
        }
        let id = MessageId(r.array::<16>()?);
        let created_at = r.time("created_at")?;
        let not_before = r.time("not_before")?;
        let expires_raw = r.array::<12>()?;
        let expires_at = if flags & FLAG_EXPIRES != 0 {
            Some(time_from(&expires_raw).ok_or(DecodeError::Invalid("expires_at"))?)
        } else if expires_raw != [0u8; 12] {
            return Err(DecodeError::Invalid("expires_at"));
        } else {
            None
        };
        let attempts = r.u32()?;
        let idempotency_key = r.string("idempotency_key")?;
        let destination = r.string("destination")?;
        let method = r.string("method")?;
        let uri = r.string("uri")?;
        let count = r.u32()? as usize;
        // Each header needs at least 8 bytes, but takes 56 in the `Vec`: never trust
        // the count for the allocation (a corrupt count would reserve 7× the input).
        let mut headers = Vec::with_capacity(count.min(r.buf.len() / 8).min(64));
        for _ in 0..count {
            let name = r.string("header name")?;
            let value = Bytes::copy_from_slice(r.bytes()?);
            headers.push((name, value));
        }
        let body = Bytes::copy_from_slice(r.bytes()?);
        if !r.buf.is_empty() {
            return Err(DecodeError::Invalid("trailing bytes"));
        }
        Ok(Envelope {
            id,
            idempotency_key,
            created_at,
            not_before,
            expires_at,
            attempts,
            destination,
            method,
            uri,
            headers,
            body,
            reason,
        })
    }
}

/// The idempotency key of an encoded envelope, read without decoding the rest (for
/// backends that only need the key, e.g. to drop it from an index on ack). `None` if
/// the input is not a well-formed start of a version-1 envelope.
#[cfg_attr(not(feature = "embedded"), allow(dead_code))] // only the embedded queue needs it
pub(crate) fn peek_idempotency_key(input: &[u8]) -> Option<&str> {
    if input.get(..4)? != MAGIC || *input.get(4)? != VERSION {
        return None;
    }
    let mut r = Reader {
        buf: input.get(FIXED_LEN..)?,
    };
    std::str::from_utf8(r.bytes().ok()?).ok()
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).expect("envelope field longer than u32::MAX");
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

/// Seconds (i64, floor) and nanoseconds (u32, `0..1e9`) relative to the Unix epoch.
fn put_time(out: &mut Vec<u8>, t: SystemTime) {
    let (secs, nanos) = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            // Floor seconds: one more before the epoch when there are nanoseconds.
            // (`-i64::MAX` would be one second off at `i64::MIN`.)
            let d = e.duration();
            let (floor, nanos) = match d.subsec_nanos() {
                0 => (0i64, 0),
                n => (-1, 1_000_000_000 - n),
            };
            (
                floor.checked_sub_unsigned(d.as_secs()).unwrap_or(i64::MIN),
                nanos,
            )
        }
    };
    out.extend_from_slice(&secs.to_le_bytes());
    out.extend_from_slice(&nanos.to_le_bytes());
}

fn time_from(raw: &[u8; 12]) -> Option<SystemTime> {
    let mut s = [0u8; 8];
    s.copy_from_slice(&raw[..8]);
    let mut n = [0u8; 4];
    n.copy_from_slice(&raw[8..]);
    let secs = i64::from_le_bytes(s);
    let nanos = u32::from_le_bytes(n);
    if nanos >= 1_000_000_000 {
        return None;
    }
    let base = if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs.unsigned_abs()))?
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(std::time::Duration::from_secs(secs.unsigned_abs()))?
    };
    base.checked_add(std::time::Duration::from_nanos(u64::from(nanos)))
}

/// A bounds-checked cursor: every read is `Truncated` rather than a panic.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array::<4>()?))
    }

    fn time(&mut self, field: &'static str) -> Result<SystemTime, DecodeError> {
        time_from(&self.array::<12>()?).ok_or(DecodeError::Invalid(field))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Invalid(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn sample() -> Envelope {
        Envelope {
            id: MessageId(*b"\x01\x8f\x3a\x5b\x7c\x00\x70\x01\x80\x00\x00\x00\x00\x00\x00\x2a"),
            idempotency_key: "k-1".into(),
            created_at: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            not_before: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_030, 0),
            expires_at: Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_086_400, 0)),
            attempts: 2,
            destination: "api:443".into(),
            method: "POST".into(),
            uri: "https://api/x".into(),
            headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
            body: Bytes::from_static(b"hi"),
            reason: DeferReason::CircuitOpen,
        }
    }

    #[test]
    fn round_trips_sample() {
        let e = sample();
        let enc = e.encode();
        assert_eq!(&enc[..4], b"PBOX");
        assert_eq!(enc[4], 1);
        assert_eq!(Envelope::decode(&enc), Ok(e));
    }

    #[test]
    fn documented_example() {
        let doc = include_str!("../../docs/envelope.md");
        let dump = doc
            .split("```text")
            .nth(1)
            .unwrap()
            .split("```")
            .next()
            .unwrap();
        let mut bytes = Vec::new();
        for line in dump.trim().lines() {
            for pair in line[10..58].split_whitespace() {
                bytes.push(u8::from_str_radix(pair, 16).unwrap());
            }
        }
        assert_eq!(sample().encode(), bytes);
        assert_eq!(Envelope::decode(&bytes), Ok(sample()));
    }

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        assert_eq!(sample().encoded_len(), sample().encode().len());
    }

    #[test]
    fn debug_output_redacts_credentials_and_leaves_the_body_out() {
        let mut env = Envelope::new(
            "api:443",
            "POST",
            "https://user:pw-222@api/orders?page=2&access_token=at-333&X-Amz-Signature=sg-444&key=mk-555#top",
            Bytes::from_static(b"card=4111111111111111"),
            DeferReason::CircuitOpen,
        );
        env.headers = vec![
            ("Authorization".into(), Bytes::from_static(b"Bearer s3cret")),
            ("cookie".into(), Bytes::from_static(b"session=abc")),
            ("X-Auth-Token".into(), Bytes::from_static(b"tok-123")),
            ("x-client-secret".into(), Bytes::from_static(b"shh-456")),
            ("x-goog-api-key".into(), Bytes::from_static(b"AIza789")),
            (
                "Ocp-Apim-Subscription-Key".into(),
                Bytes::from_static(b"sub-000"),
            ),
            ("x_api_key".into(), Bytes::from_static(b"und-111")),
            ("idempotency-key".into(), Bytes::from_static(b"order-7")),
            (
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            ),
        ];
        let shown = format!("{env:?}");
        for secret in [
            "s3cret",
            "session=abc",
            "4111",
            "tok-123",
            "shh-456",
            "AIza789",
            "sub-000",
            "und-111",
            "pw-222",
            "at-333",
            "sg-444",
            "mk-555",
        ] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains("https://<redacted>@api/orders?page=2&access_token=<redacted>"),
            "{shown}"
        );
        assert!(shown.contains("key=<redacted>#top"), "{shown}");
        assert!(shown.contains("application/json"), "{shown}");
        assert!(shown.contains("order-7"), "not a credential: {shown}");
        assert!(shown.contains("<21 bytes>"), "{shown}");
    }

    #[test]
    fn rejects_bad_magic_version_flags_reason_reserved_expiry_and_trailing() {
        let enc = sample().encode();
        let mut bad = enc.clone();
        bad[0] = b'X';
        assert_eq!(Envelope::decode(&bad), Err(DecodeError::BadMagic));
        assert_eq!(Envelope::decode(b"GET /"), Err(DecodeError::BadMagic));
        let mut bad = enc.clone();
        bad[4] = 2;
        assert_eq!(Envelope::decode(&bad), Err(DecodeError::UnknownVersion(2)));
        let mut bad = enc.clone();
        bad[5] = 9;
        assert_eq!(Envelope::decode(&bad), Err(DecodeError::Invalid("reason")));
        let mut bad = enc.clone();
        bad[6] = 0x80;
        assert_eq!(Envelope::decode(&bad), Err(DecodeError::Invalid("flags")));
        let mut bad = enc.clone();
        bad[7] = 1;
        assert_eq!(
            Envelope::decode(&bad),
            Err(DecodeError::Invalid("reserved"))
        );
        // `expires_at` written without its flag.
        let mut bad = enc.clone();
        bad[6] = 0;
        assert_eq!(
            Envelope::decode(&bad),
            Err(DecodeError::Invalid("expires_at"))
        );
        let mut bad = enc.clone();
        bad.push(0);
        assert_eq!(
            Envelope::decode(&bad),
            Err(DecodeError::Invalid("trailing bytes"))
        );
        let mut bad = enc;
        bad[32..36].copy_from_slice(&[0xff; 4]); // created_at nanos >= 1e9
        assert_eq!(
            Envelope::decode(&bad),
            Err(DecodeError::Invalid("created_at"))
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let enc = sample().encode();
        for n in 0..enc.len() {
            assert_eq!(
                Envelope::decode(&enc[..n]),
                Err(DecodeError::Truncated),
                "prefix {n}"
            );
        }
    }

    /// `Envelope::new`'s key is a UUIDv7 of its own: the ids of one millisecond count
    /// up, so a key equal to the id (as it was) gave away the keys of the envelopes
    /// made next to a caller shown one.
    #[test]
    fn a_new_envelopes_key_cannot_be_worked_out_from_its_id() {
        let new = || Envelope::new("api", "POST", "http://api/x", "", DeferReason::CircuitOpen);
        let (a, b) = (new(), new());
        for e in [&a, &b] {
            assert_ne!(e.idempotency_key, e.id.to_string());
            let key: MessageId = e.idempotency_key.parse().unwrap();
            assert_eq!(key.0[6] >> 4, 7, "a UUIDv7");
        }
        assert_ne!(a.idempotency_key, b.idempotency_key);
    }

    #[test]
    fn peeks_the_idempotency_key() {
        let enc = sample().encode();
        assert_eq!(peek_idempotency_key(&enc), Some("k-1"));
        assert_eq!(peek_idempotency_key(&enc[..66]), None);
        assert_eq!(peek_idempotency_key(b"PBOX"), None);
    }

    #[test]
    fn times_before_the_epoch_round_trip() {
        let mut e = sample();
        e.created_at = SystemTime::UNIX_EPOCH - Duration::new(10, 250);
        e.not_before = SystemTime::UNIX_EPOCH - Duration::new(3, 0);
        assert_eq!(Envelope::decode(&e.encode()), Ok(e.clone()));
        // The earliest time the format holds, `i64::MIN` seconds, where negating the
        // seconds would overflow: written one second late before.
        e.created_at = SystemTime::UNIX_EPOCH - Duration::from_secs(1 << 63);
        e.not_before = SystemTime::UNIX_EPOCH - Duration::new((1 << 63) - 1, 1);
        assert_eq!(Envelope::decode(&e.encode()), Ok(e));
    }

    /// A scheme-relative URI (`//user:pw@host/…`, as a foreign producer may write one)
    /// has its userinfo redacted too.
    #[test]
    fn a_scheme_relative_uris_userinfo_is_redacted() {
        let shown = format!("{:?}", RedactedUri("//user:pw-222@api/orders"));
        assert!(!shown.contains("pw-222"), "{shown}");
        assert!(shown.contains("//<redacted>@api/orders"), "{shown}");
    }

    /// A `://` in the query of a URI without a scheme (a server's `/path?…`) is not
    /// read as the scheme's: the query before it is still redacted. (Everything up to
    /// an `@` after it was shown as it was, a token included.)
    #[test]
    fn a_url_in_the_query_of_a_path_is_not_taken_for_the_scheme() {
        let shown = format!(
            "{:?}",
            RedactedUri("/cb?access_token=tok-333&next=https://u@x/y")
        );
        assert!(!shown.contains("tok-333"), "{shown}");
        assert!(shown.contains("next=https://u@x/y"), "{shown}");
    }

    /// Parameters separated by `;` are redacted as those separated by `&`; a `;` with
    /// no `=` after it is part of the value before it.
    #[test]
    fn a_credential_after_a_semicolon_is_redacted() {
        let shown = format!("{:?}", RedactedUri("https://api/x?page=2;token=tok-444"));
        assert!(!shown.contains("tok-444"), "{shown}");
        assert!(shown.contains("?page=2;token=<redacted>"), "{shown}");
        let shown = format!(
            "{:?}",
            RedactedUri("https://api/x?password=ab;cd-555&q=a;b")
        );
        assert!(!shown.contains("cd-555"), "{shown}");
        assert!(shown.contains("?password=<redacted>&q=a;b"), "{shown}");
    }

    /// A credential's name written with `%XX` escapes (`api%5Fkey`) is read decoded.
    #[test]
    fn an_escaped_credential_name_is_redacted() {
        let shown = format!("{:?}", RedactedUri("https://api/x?api%5Fkey=ak-1&page=2"));
        assert!(!shown.contains("ak-1"), "{shown}");
        assert!(shown.contains("page=2"), "{shown}");
    }

    /// A credential in a URI's fragment (`#access_token=…`, an OAuth implicit-flow
    /// callback an envelope built by hand or by another producer may carry) is redacted
    /// as one in its query; so is any parameter whose name ends in `key` (`access_key`,
    /// `private_key`, `clientKey`). (Both were shown.)
    #[test]
    fn a_credential_in_the_fragment_or_a_key_parameter_is_redacted() {
        for uri in [
            "https://app/cb#access_token=tok-1",
            "https://app/cb?state=1#id_token=tok-1&x=2",
            "https://api/x?access_key=tok-1&page=2",
            "https://api/x?private_key=tok-1",
            "https://api/x?clientKey=tok-1",
        ] {
            let shown = format!("{:?}", RedactedUri(uri));
            assert!(!shown.contains("tok-1"), "{shown}");
        }
        let shown = format!("{:?}", RedactedUri("https://app/cb?state=1&page=2#top"));
        assert!(shown.contains("state=1&page=2#top"), "{shown}");
    }

    #[test]
    fn v7_ids_are_increasing_and_well_formed() {
        let mut prev = MessageId::new_v7();
        for _ in 0..10_000 {
            let id = MessageId::new_v7();
            assert!(id > prev);
            assert_eq!(id.0[6] >> 4, 7, "version");
            assert_eq!(id.0[8] >> 6, 0b10, "variant");
            prev = id;
        }
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(prev.timestamp_ms().abs_diff(now_ms) < 60_000);
        assert_eq!(prev.to_string().parse::<MessageId>(), Ok(prev));
        assert_eq!(
            prev.to_string().replace('-', "").parse::<MessageId>(),
            Ok(prev)
        );
        assert!("not-an-id".parse::<MessageId>().is_err());
    }

    fn arb_time() -> impl Strategy<Value = SystemTime> {
        (any::<bool>(), 0u64..(1 << 40), 0u32..1_000_000_000).prop_map(|(neg, s, n)| {
            let d = Duration::new(s, n);
            if neg {
                SystemTime::UNIX_EPOCH - d
            } else {
                SystemTime::UNIX_EPOCH + d
            }
        })
    }

    fn arb_envelope() -> impl Strategy<Value = Envelope> {
        (
            (
                any::<[u8; 16]>(),
                ".{0,20}",
                arb_time(),
                arb_time(),
                proptest::option::of(arb_time()),
                any::<u32>(),
            ),
            (".{0,20}", "[A-Z]{0,8}", ".{0,40}"),
            proptest::collection::vec(
                (".{0,12}", proptest::collection::vec(any::<u8>(), 0..16)),
                0..5,
            ),
            proptest::collection::vec(any::<u8>(), 0..300),
            1u8..=4,
        )
            .prop_map(
                |((id, key, c, nb, exp, attempts), (dest, method, uri), headers, body, reason)| {
                    Envelope {
                        id: MessageId(id),
                        idempotency_key: key,
                        created_at: c,
                        not_before: nb,
                        expires_at: exp,
                        attempts,
                        destination: dest,
                        method,
                        uri,
                        headers: headers
                            .into_iter()
                            .map(|(n, v)| (n, Bytes::from(v)))
                            .collect(),
                        body: Bytes::from(body),
                        reason: DeferReason::from_code(reason).unwrap(),
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(e in arb_envelope()) {
            prop_assert_eq!(Envelope::decode(&e.encode()), Ok(e));
        }

        #[test]
        fn truncated_prefixes_are_errors(e in arb_envelope(), cut in any::<prop::sample::Index>()) {
            let enc = e.encode();
            let n = cut.index(enc.len());
            prop_assert!(Envelope::decode(&enc[..n]).is_err());
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Envelope::decode(&b);
        }

        /// Random bytes after a valid magic and version reach the field parser (bare
        /// random bytes almost never get past the magic).
        #[test]
        fn random_fields_after_the_header_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut input = MAGIC.to_vec();
            input.push(VERSION);
            input.extend_from_slice(&b);
            let _ = Envelope::decode(&input);
        }

        #[test]
        fn mutated_envelopes_never_panic(e in arb_envelope(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut enc = e.encode();
            let i = at.index(enc.len());
            enc[i] = byte;
            let _ = Envelope::decode(&enc);
        }
    }
}
