//! [`RedisStore`]: an [`IdempotencyStore`] in Redis, shared by every instance of a
//! service and kept across restarts.

use super::fingerprint::Fingerprint;
use super::store::{Claim, ClaimToken, IdempotencyStore, StoredResponse};
use crate::BoxError;
use crate::queue::redis::Link;
use ::redis::{FromRedisValue, Script, ScriptInvocation};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// Claims the key unless it is claimed or done: `P` (claimed now), `C` (in progress), or
/// the remembered response (`D…`); of a response in another encoding version than
/// `ARGV[3]`, only its `D` and version (a repeat waiting on one, as in progress, would
/// fetch all of it every 50 ms).
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local v = redis.call('GET', KEYS[1])
if v then
  if string.sub(v, 1, 1) == 'D' then
    if string.byte(v, 2) == tonumber(ARGV[3]) then return v end
    return string.sub(v, 1, 2)
  end
  return 'C'
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 'P'",
    )
});

/// Replaces the claim `ARGV[1]` with the response `ARGV[2]` for `ARGV[3]` ms, also if the
/// claim expired and nobody claimed the key since (as `MemoryStore` does): 1, or 0 if
/// another request holds the key or it has a response.
static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or not v then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0",
    )
});

/// Deletes the claim `ARGV[1]`, if it is still the key's.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

/// Extends the claim `ARGV[1]` to `ARGV[2]` ms from now: 1, or 0 if it is not the key's.
static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0",
    )
});

/// The version of the encoding of a remembered response (after its `D`).
const VERSION: u8 = 1;

/// An [`IdempotencyStore`] in Redis: every instance of a service that shares it
/// answers the repeats of a key any of them ran, a restart or a deploy forgets nothing,
/// and Redis's own memory limit (not a count in the process) bounds what it keeps.
/// Behind several instances, and for the replays of deferred requests (which may come
/// a day later and reach any instance), this is the store that makes the effect
/// exactly once.
///
/// One Redis string per key, `PREFIX` + the key (`postbox:idem:` by default):
/// `C` and the claim's token while a request runs (with `lock_for` as its Redis
/// expiry, so a crashed instance's claim ends by itself), then `D` and the response
/// (status, headers, body, trailers and fingerprint, in a versioned binary encoding)
/// with the TTL as its expiry. Every change is one Lua script, atomic on the server: a
/// claim taken over after it expired cannot be completed, released or extended by
/// its first holder.
///
/// Claims are not watched: a duplicate waits by polling (every 50 ms, the trait's
/// default). A release from `Drop` is sent on a task of its own when a Tokio runtime
/// is at hand, and otherwise left to the claim's expiry.
///
/// Configure the server as for the queue: with `maxmemory-policy noeviction` (every
/// key here has an expiry, so a `volatile-*` policy would evict live claims, letting
/// two requests of one key run at once, and remembered responses), and with
/// persistence (`appendonly yes`) if a restart of Redis must not forget the keys. With
/// `noeviction` and the memory full, claims of new keys fail, and the layer runs those
/// requests without de-duplication (it fails open, and counts them as
/// `store_failed`). A remembered response this version cannot read (written by a newer
/// one) is answered as in progress, never by running the handler again. Keys of two
/// services sharing a server must not overlap: give each a prefix that is not the
/// start of the other's.
///
/// ```no_run
/// use postbox::idempotency::{IdempotencyLayer, RedisStore};
/// use std::sync::Arc;
///
/// # async fn build() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let layer = IdempotencyLayer::with_store(Arc::new(store));
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    link: Arc<Link>,
    prefix: Arc<str>,
}

impl RedisStore {
    /// The prefix of the Redis keys, by default.
    pub const DEFAULT_PREFIX: &'static str = "postbox:idem:";

    /// Connects to the Redis server at `url` (`redis://[:password@]host[:port][/db]`),
    /// with a 2 s connect timeout and a 2 s response timeout, and the default prefix.
    /// The connection is made again when its socket fails, and also, as the queue's
    /// is, when a call goes unanswered or a node demoted by a failover refuses a write
    /// (`READONLY`): otherwise every claim would fail (and the layer fail open) until
    /// the process restarts.
    ///
    /// # Errors
    /// The URL is invalid, the server cannot be reached or refuses the credentials or
    /// database, or no Tokio runtime is running.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        Self::connect_with(url, Duration::from_secs(2)).await
    }

    /// [`connect`](Self::connect) with a response timeout of `response_timeout`: a
    /// call unanswered after it fails (and the layer runs the request without
    /// de-duplication).
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn connect_with(url: &str, response_timeout: Duration) -> Result<Self, BoxError> {
        let link = Link::open(url, "idempotency store", response_timeout).await?;
        Ok(Self {
            link,
            prefix: Self::DEFAULT_PREFIX.into(),
        })
    }

    /// Runs `script` on the current connection; a failure that calls for a new
    /// connection (unanswered, or refused by a demoted node) has one made.
    async fn run<T: FromRedisValue>(&self, script: ScriptInvocation<'_>) -> Result<T, BoxError> {
        script
            .invoke_async(&mut self.link.conn())
            .await
            .map_err(|e| self.link.failed(e).into())
    }

    /// Keys are stored under `prefix` + the idempotency key (by default
    /// `postbox:idem:`): one prefix per service, if services share a server.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().into();
        self
    }

    /// Gives up the claim `token` on `key` and waits for the server's answer: `true` if
    /// it was the key's claim (else it was taken over, completed, or had expired).
    /// [`release`](IdempotencyStore::release) sends the same on a task of its own.
    ///
    /// # Errors
    /// The server cannot be reached; the claim then ends at its expiry.
    pub async fn release_now(&self, key: &str, token: ClaimToken) -> Result<bool, BoxError> {
        let mut script = RELEASE.key(self.redis_key(key));
        script.arg(claim_value(token));
        let released: i64 = self.run(script).await?;
        Ok(released == 1)
    }

    /// The Redis key of `key`.
    pub fn redis_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A claim asked for and not yet answered: released on drop while `armed` (see
/// [`RedisStore::claim`]).
struct Unanswered<'a> {
    store: &'a RedisStore,
    rkey: String,
    token: ClaimToken,
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the claim ends at its expiry
        };
        let (store, rkey, token) = (
            self.store.clone(),
            std::mem::take(&mut self.rkey),
            self.token,
        );
        runtime.spawn(async move {
            let mut script = RELEASE.key(&rkey);
            script.arg(claim_value(token));
            if let Err(e) = store.run::<i64>(script).await {
                tracing::debug!(error = %e, "unanswered idempotency claim not released; it ends at its expiry");
            }
        });
    }
}

/// The value of a claim: `C` and the token.
fn claim_value(token: ClaimToken) -> Vec<u8> {
    let mut v = Vec::with_capacity(9);
    v.push(b'C');
    v.extend_from_slice(&token.0.to_be_bytes());
    v
}

/// `d` in milliseconds rounded up (a claim must not end on the server before the
/// layer thinks it does), at least 1 (`PX 0` is an error) and at most a Redis expiry
/// can be.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .clamp(1, i64::MAX as u64 / 2)
}

impl IdempotencyStore for RedisStore {
    fn claim(
        &self,
        key: &str,
        lock_for: Duration,
    ) -> impl Future<Output = Result<Claim, BoxError>> + Send {
        let rkey = self.redis_key(key);
        async move {
            let token = ClaimToken::random();
            let mut script = CLAIM.key(&rkey);
            script
                .arg(claim_value(token))
                .arg(millis(lock_for))
                .arg(VERSION);
            // Until its answer is read, the claim may have been taken on the server
            // for a caller that will never hold it: this future dropped while the
            // script ran (the request cancelled), or its reply lost (the response
            // timeout). Released then, or the key would be in progress, for nobody,
            // for `lock_for`.
            let mut unanswered = Unanswered {
                store: self,
                rkey,
                token,
                armed: true,
            };
            let v: Vec<u8> = self.run(script).await?;
            unanswered.armed = false;
            let rkey = &unanswered.rkey;
            match v.first() {
                Some(b'P') => Ok(Claim::Proceed(token)),
                Some(b'C') => Ok(Claim::InProgress),
                Some(b'D') => match decode(&v[1..]) {
                    Ok(response) => Ok(Claim::Done(response)),
                    // The key is done (a response was stored), but this process cannot
                    // read it: one written by a newer version, during a rolling deploy
                    // or after a rollback. Running the handler again would repeat its
                    // effect; in progress, the repeat is answered `409` (after waiting
                    // `lock_for`) and tried again later.
                    Err(e) => {
                        tracing::warn!(
                            key = %rkey,
                            error = %e,
                            "idempotency store: a remembered response cannot be read; \
                             the repeat is answered as in progress"
                        );
                        Ok(Claim::InProgress)
                    }
                },
                _ => Err(format!("idempotency store: unexpected value under {rkey:?}").into()),
            }
        }
    }

    fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let rkey = self.redis_key(key);
        async move {
            let mut script = COMPLETE.key(&rkey);
            script
                .arg(claim_value(token))
                .arg(encode(&response))
                .arg(millis(ttl));
            let stored: i64 = self.run(script).await?;
            if stored == 0 {
                tracing::debug!(key = %rkey, "idempotency store: the key was claimed by another request; response not stored");
            }
            Ok(())
        }
    }

    fn release(&self, key: &str, token: ClaimToken) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // the claim ends at its expiry
        };
        let (store, key) = (self.clone(), key.to_owned());
        runtime.spawn(async move {
            if let Err(e) = store.release_now(&key, token).await {
                tracing::debug!(error = %e, "idempotency claim not released; it ends at its expiry");
            }
        });
    }

    fn extend(
        &self,
        key: &str,
        token: ClaimToken,
        lock_for: Duration,
    ) -> impl Future<Output = Result<bool, BoxError>> + Send {
        let rkey = self.redis_key(key);
        async move {
            let mut script = EXTEND.key(&rkey);
            script
                .arg(claim_value(token))
                .arg(millis(lock_for))
                .arg(VERSION);
            let extended: i64 = self.run(script).await?;
            Ok(extended == 1)
        }
    }
}

/// `r` encoded, after a `D`: version, status, fingerprint, headers, trailers, body.
fn encode(r: &StoredResponse) -> Vec<u8> {
    fn fields(out: &mut Vec<u8>, h: &HeaderMap) {
        out.extend_from_slice(&(h.len() as u32).to_be_bytes());
        for (name, value) in h {
            bytes_field(out, name.as_str().as_bytes());
            bytes_field(out, value.as_bytes());
        }
    }
    fn bytes_field(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u64).to_be_bytes());
        out.extend_from_slice(b);
    }
    let mut out = Vec::with_capacity(64 + r.body.len());
    out.push(b'D');
    out.push(VERSION);
    out.extend_from_slice(&r.status.as_u16().to_be_bytes());
    match r.fingerprint {
        Some(f) => {
            out.push(1);
            out.extend_from_slice(&f.hash.to_be_bytes());
            out.extend_from_slice(&f.body_len.to_be_bytes());
        }
        None => out.push(0),
    }
    fields(&mut out, &r.headers);
    match &r.trailers {
        Some(t) => {
            out.push(1);
            fields(&mut out, t);
        }
        None => out.push(0),
    }
    bytes_field(&mut out, &r.body);
    out
}

/// Reads what [`encode`] wrote after its `D`.
fn decode(mut input: &[u8]) -> Result<StoredResponse, String> {
    fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if input.len() < n {
            return Err("truncated".into());
        }
        let (head, rest) = input.split_at(n);
        *input = rest;
        Ok(head)
    }
    fn u64_of(input: &mut &[u8]) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            take(input, 8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes_field<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], String> {
        let n = usize::try_from(u64_of(input)?).map_err(|_| "a field too long")?;
        take(input, n)
    }
    fn fields(input: &mut &[u8]) -> Result<HeaderMap, String> {
        let n = u32::from_be_bytes(take(input, 4)?.try_into().expect("4 bytes"));
        // Room left for the layers the replayed answer passes through, which add
        // headers of their own: a map filled to what it holds (24 576 names) panics on
        // the next insert, our `idempotent-replayed` first. No answer a server sends
        // comes near (hyper reads at most 100 fields of HTTP/1, 16 KiB of HTTP/2).
        if n > MAX_FIELDS {
            return Err(format!(
                "{n} header fields: a stored answer has at most {MAX_FIELDS}"
            ));
        }
        let mut h = HeaderMap::new();
        for _ in 0..n {
            let name = HeaderName::from_bytes(bytes_field(input)?).map_err(|e| e.to_string())?;
            let value = HeaderValue::from_bytes(bytes_field(input)?).map_err(|e| e.to_string())?;
            h.try_append(name, value)
                .map_err(|_| "more header fields than a header map holds")?;
        }
        Ok(h)
    }
    const MAX_FIELDS: u32 = 8192;
    let version = take(&mut input, 1)?[0];
    if version != VERSION {
        return Err(format!(
            "encoding version {version}, this one reads {VERSION}"
        ));
    }
    let status = u16::from_be_bytes(take(&mut input, 2)?.try_into().expect("2 bytes"));
    let status = StatusCode::from_u16(status).map_err(|e| e.to_string())?;
    let fingerprint = match take(&mut input, 1)?[0] {
        0 => None,
        1 => Some(Fingerprint {
            hash: u64_of(&mut input)?,
            body_len: u64_of(&mut input)?,
        }),
        f => return Err(format!("fingerprint flag {f}")),
    };
    let headers = fields(&mut input)?;
    let trailers = match take(&mut input, 1)?[0] {
        0 => None,
        1 => Some(fields(&mut input)?),
        t => return Err(format!("trailers flag {t}")),
    };
    let body = Bytes::copy_from_slice(bytes_field(&mut input)?);
    if !input.is_empty() {
        return Err("bytes after the body".into());
    }
    Ok(StoredResponse {
        status,
        headers,
        body,
        trailers,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(b"{\"order\":42}"),
            trailers: Some(trailers),
            fingerprint: Some(Fingerprint {
                hash: 0xdead_beef,
                body_len: Fingerprint::HEAD_ONLY,
            }),
        }
    }

    #[test]
    fn a_response_reads_back_as_it_was_stored() {
        for r in [
            full(),
            StoredResponse {
                status: StatusCode::NO_CONTENT,
                headers: HeaderMap::new(),
                body: Bytes::new(),
                trailers: None,
                fingerprint: None,
            },
        ] {
            let enc = encode(&r);
            assert_eq!(enc[0], b'D');
            assert_eq!(decode(&enc[1..]), Ok(r));
        }
    }

    #[test]
    fn a_damaged_or_newer_response_is_an_error_not_a_panic() {
        let enc = encode(&full());
        for n in 1..enc.len() {
            assert!(decode(&enc[1..n]).is_err(), "truncated at {n}");
        }
        let mut newer = enc.clone();
        newer[1] = VERSION + 1;
        assert!(decode(&newer[1..]).unwrap_err().contains("version"));
        let mut longer = enc;
        longer.push(0);
        assert!(decode(&longer[1..]).is_err());
    }

    #[test]
    fn more_header_fields_than_a_map_holds_are_an_error_not_a_panic() {
        let stored = |fields: u32| {
            let mut enc = vec![VERSION];
            enc.extend_from_slice(&201u16.to_be_bytes());
            enc.push(0);
            enc.extend_from_slice(&fields.to_be_bytes());
            for i in 0..fields {
                let name = format!("h{i}");
                enc.extend_from_slice(&(name.len() as u64).to_be_bytes());
                enc.extend_from_slice(name.as_bytes());
                enc.extend_from_slice(&0u64.to_be_bytes());
            }
            enc.push(0);
            enc.extend_from_slice(&0u64.to_be_bytes());
            enc
        };
        assert!(decode(&stored(40_000)).is_err());
        // Exactly what a map holds (24 576 names) decoded, and the replay's own header
        // then panicked: refused well below it.
        assert!(decode(&stored(24_576)).is_err());
        assert!(decode(&stored(8193)).is_err());
        assert!(decode(&stored(100)).is_ok());
    }

    #[test]
    fn expiries_are_whole_positive_milliseconds() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::from_millis(7)), 7);
        assert_eq!(millis(Duration::from_secs(86_400)), 86_400_000);
        assert!(millis(Duration::MAX) <= i64::MAX as u64);
    }
}
