//! Request fingerprints: what tells a retry of a request from a different request that
//! reuses its key.

use bytes::Buf;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

/// What identifies the request that first used a key: a hash of its method, path and
/// query, `Content-Type` and body, and the body's length.
///
/// A repeat of the key whose fingerprint differs is a different request reusing the
/// key (a client bug), answered `422` instead of with the first request's response.
///
/// If the handler did not read the whole body (it answered from the head alone: a
/// `415` for the content type, a `400` for the query), or a frame of it came in more
/// than 64 pieces to hash, the fingerprint is of the head only, with `body_len`
/// [`HEAD_ONLY`](Self::HEAD_ONLY): repeats are compared by method, path and query and
/// content type, not by body.
/// The hash is stable across processes, builds and platforms, so instances sharing a
/// store compare each other's fingerprints; it is not a cryptographic hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    /// The hash.
    pub hash: u64,
    /// The body's length in bytes, or [`HEAD_ONLY`](Self::HEAD_ONLY).
    pub body_len: u64,
}

impl Fingerprint {
    /// The `body_len` of a fingerprint of the head alone (the handler did not read the
    /// whole body).
    pub const HEAD_ONLY: u64 = u64::MAX;

    /// Whether only the head was hashed.
    pub const fn is_head_only(&self) -> bool {
        self.body_len == Self::HEAD_ONLY
    }
}

/// A streaming hash, eight bytes at a time (the same bytes give the same hash however
/// they are split into frames).
#[derive(Debug, Clone)]
pub(crate) struct Hasher {
    h: u64,
    tail: [u8; 8],
    tail_len: usize,
    len: u64,
}

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher {
    /// A hasher that has read the request's head: method, path and query, content type.
    pub(crate) fn of_head<B>(req: &Request<B>) -> Self {
        let mut h = Self::seeded(0x243F_6A88_85A3_08D3);
        let pq = req.uri().path_and_query().map_or("", |pq| pq.as_str());
        let ct = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map_or(&[][..], |v| v.as_bytes());
        for field in [req.method().as_str().as_bytes(), pq.as_bytes(), ct] {
            h.mix(field.len() as u64);
            h.mix_bytes(field);
        }
        h
    }

    /// A hash of the scope headers' values (`None`: the header is absent, which is not
    /// the same as an empty value), stable across processes, builds and platforms like
    /// the fingerprint, so instances sharing a store agree on the scope. (One header
    /// hashes as it did before several could be given.)
    pub(crate) fn of_scope<'a>(values: impl IntoIterator<Item = Option<&'a [u8]>>) -> u64 {
        let mut h = Self::seeded(0x1319_8A2E_0370_7344);
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                // Where one value ends: `("ab", "c")` is not `("a", "bc")`.
                let len = h.len;
                h.mix(len);
            }
            h.mix(u64::from(value.is_some()));
            h.write(value.unwrap_or_default());
        }
        h.finish().hash
    }

    /// A hasher that has read nothing, starting from `seed` (one per use, so a scope
    /// and a fingerprint of the same bytes differ).
    const fn seeded(seed: u64) -> Self {
        Self {
            h: seed,
            tail: [0; 8],
            tail_len: 0,
            len: 0,
        }
    }

    #[inline]
    fn mix(&mut self, w: u64) {
        self.h = (self.h.rotate_left(23) ^ w).wrapping_mul(K);
    }

    /// Mixes a whole field (its tail padded with zeros).
    fn mix_bytes(&mut self, b: &[u8]) {
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(w));
        }
    }

    /// Adds body bytes.
    pub(crate) fn write(&mut self, mut b: &[u8]) {
        self.len += b.len() as u64;
        if self.tail_len > 0 {
            let take = (8 - self.tail_len).min(b.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&b[..take]);
            self.tail_len += take;
            b = &b[take..];
            if self.tail_len < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.tail));
            self.tail_len = 0;
        }
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.mix(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    /// Adds every byte of `data` (all its chunks); `false` if there were too many
    /// chunks to see them all.
    pub(crate) fn write_buf(&mut self, data: &impl Buf) -> bool {
        let mut slices = [IoSlice::new(&[]); 64];
        let n = data.chunks_vectored(&mut slices);
        let mut seen = 0;
        for s in &slices[..n] {
            self.write(s);
            seen += s.len();
        }
        seen == data.remaining()
    }

    /// The fingerprint of the head this hasher started from, whatever body it has
    /// read since (see [`Fingerprint::HEAD_ONLY`]).
    pub(crate) fn head_only(head: &Self) -> Fingerprint {
        let mut h = head.clone();
        h.mix(Fingerprint::HEAD_ONLY);
        Fingerprint {
            body_len: Fingerprint::HEAD_ONLY,
            ..h.finish()
        }
    }

    /// The fingerprint of everything written.
    pub(crate) fn finish(mut self) -> Fingerprint {
        let mut w = [0; 8];
        w[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
        self.mix(u64::from_le_bytes(w));
        self.mix(self.len);
        // splitmix64's finalizer: every input bit reaches every output bit.
        let mut z = self.h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Fingerprint {
            hash: z ^ (z >> 31),
            body_len: self.len,
        }
    }
}

/// The fingerprint being taken of a request body as the handler reads it.
#[derive(Debug)]
pub(crate) struct Tap {
    state: Mutex<TapState>,
    /// The fingerprint of the head alone: the one stored if the body is not read whole.
    head: Fingerprint,
}

#[derive(Debug)]
enum TapState {
    Reading(Hasher),
    Done(Fingerprint),
    /// A frame could not be seen whole: no fingerprint.
    Lost,
    /// The body failed (its client went away mid-upload): no fingerprint, and the
    /// request never arrived whole.
    Failed,
}

impl Tap {
    fn new(hasher: Hasher) -> Self {
        Self {
            head: Hasher::head_only(&hasher),
            state: Mutex::new(TapState::Reading(hasher)),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TapState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fingerprint: of the head and body if the handler read the whole body, else
    /// of the head alone ([`Fingerprint::HEAD_ONLY`]); `None` if the body failed.
    pub(crate) fn fingerprint(&self) -> Option<Fingerprint> {
        match &*self.state() {
            TapState::Done(f) => Some(*f),
            TapState::Reading(_) | TapState::Lost => Some(self.head),
            TapState::Failed => None,
        }
    }

    fn data(&self, data: &impl Buf) {
        let mut state = self.state();
        if let TapState::Reading(h) = &mut *state
            && !h.write_buf(data)
        {
            *state = TapState::Lost;
        }
    }

    fn end(&self) {
        let mut state = self.state();
        if let TapState::Reading(h) = &*state {
            *state = TapState::Done(h.clone().finish());
        }
    }

    /// Whether the request has a body the handler did not read whole, or not all of it
    /// through the hash (its fingerprint is then of the head alone, though the body, or
    /// a header about it such as `Content-Length`, may have decided the answer). An
    /// empty body is read whole at once.
    pub(crate) fn not_read_whole(&self) -> bool {
        matches!(*self.state(), TapState::Reading(_) | TapState::Lost)
    }

    /// Whether the body failed while the handler read it.
    pub(crate) fn failed(&self) -> bool {
        matches!(*self.state(), TapState::Failed)
    }

    fn fail(&self) {
        *self.state() = TapState::Failed;
    }
}

pin_project! {
    /// The request body the handler behind [`Idempotency`](super::Idempotency) reads:
    /// the caller's body, unchanged (same data, errors and size hint). For a request
    /// with a key, its bytes are hashed as the handler reads them, into the
    /// [`Fingerprint`] stored with the response.
    ///
    /// With axum and tonic nothing changes: a router takes any body. A handler written
    /// for one body type takes `Request<FingerprintedBody<B>>` instead of `Request<B>`
    /// (not `B` through [`into_inner`](Self::into_inner), which reads past the hash).
    pub struct FingerprintedBody<B> {
        #[pin]
        inner: B,
        tap: Option<Arc<Tap>>,
    }
}

impl<B: Body> FingerprintedBody<B> {
    /// `body` passed through without a fingerprint.
    pub(crate) fn untapped(inner: B) -> Self {
        Self { inner, tap: None }
    }

    /// `body`, hashed into `tap` after `hasher`'s head as it is read.
    pub(crate) fn tapped(inner: B, hasher: Hasher) -> (Self, Arc<Tap>) {
        let tap = Arc::new(Tap::new(hasher));
        if inner.is_end_stream() {
            tap.end(); // an empty body may never be polled
        }
        let body = Self {
            inner,
            tap: Some(tap.clone()),
        };
        (body, tap)
    }

    /// The caller's body, no longer hashed: read through it, the request is
    /// fingerprinted by its head alone (a repeat of the key with another body gets
    /// this one's answer, not a `422`), and a refusal (`4xx`) is not remembered, as for
    /// a handler that did not read its whole body. Read the body through
    /// `FingerprintedBody` itself to keep them.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for FingerprintedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FingerprintedBody")
            .field("inner", &self.inner)
            .field("tapped", &self.tap.is_some())
            .finish()
    }
}

impl<B: Body> Body for FingerprintedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(tap) = this.tap.as_ref() {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(data) = f.data_ref() {
                        tap.data(data);
                    }
                    if this.inner.is_end_stream() {
                        tap.end();
                    }
                }
                Some(Err(_)) => tap.fail(),
                None => tap.end(),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The fingerprint of a repeated request's `body` after `hasher`'s head, reading at
/// most `limit` bytes: `Ok(None)` past it (not the same request), `Err(())` if the
/// body failed.
pub(crate) async fn of_body<B: Body>(
    body: B,
    mut hasher: Hasher,
    limit: u64,
) -> Result<Option<Fingerprint>, ()> {
    let mut body = std::pin::pin!(body);
    loop {
        if body.is_end_stream() {
            return Ok(Some(hasher.finish()));
        }
        match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            None => return Ok(Some(hasher.finish())),
            Some(Err(_)) => return Err(()),
            Some(Ok(frame)) => {
                if let Ok(mut data) = frame.into_data() {
                    // Owned here: read chunk by chunk, however many.
                    while data.has_remaining() {
                        let chunk = data.chunk();
                        let n = chunk.len();
                        hasher.write(chunk);
                        data.advance(n);
                    }
                    if hasher.len > limit {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scope hash is pinned: it must not change between builds or Rust releases
    /// (instances sharing a store must agree; `DefaultHasher` promises neither), and
    /// an absent header is not an empty one.
    #[test]
    fn the_scope_hash_is_stable_and_tells_absent_from_empty() {
        assert_ne!(Hasher::of_scope([None]), Hasher::of_scope([Some(&b""[..])]));
        assert_ne!(
            Hasher::of_scope([Some(&b"Bearer alice"[..])]),
            Hasher::of_scope([Some(&b"Bearer bob"[..])])
        );
        const PINNED: u64 = 0x5F07_BFB3_20AF_7C61;
        assert_eq!(Hasher::of_scope([Some(&b"Bearer alice"[..])]), PINNED);
        // Several headers: each value delimited, the absent one told from an empty one.
        let two = |a: Option<&'static [u8]>, b: Option<&'static [u8]>| Hasher::of_scope([a, b]);
        assert_ne!(
            two(Some(&b"ab"[..]), Some(&b"c"[..])),
            two(Some(&b"a"[..]), Some(&b"bc"[..]))
        );
        assert_ne!(
            two(Some(&b"a"[..]), None),
            two(Some(&b"a"[..]), Some(&b""[..]))
        );
        assert_ne!(
            two(Some(&b"a"[..]), Some(&b"b"[..])),
            two(Some(&b"b"[..]), Some(&b"a"[..]))
        );
    }

    fn head() -> Hasher {
        Hasher::of_head(&Request::post("/orders?x=1").body(()).unwrap())
    }

    fn of(chunks: &[&[u8]]) -> Fingerprint {
        let mut h = head();
        for c in chunks {
            h.write(c);
        }
        h.finish()
    }

    #[test]
    fn the_same_bytes_split_differently_give_the_same_fingerprint() {
        let whole = of(&[b"{\"order\":42,\"qty\":3}"]);
        assert_eq!(whole, of(&[b"{\"ord", b"er\":42,", b"", b"\"qty\":3}"]));
        assert_eq!(whole, of(&[b"{", b"\"order\":42,\"qty\":3", b"}"]));
        assert_eq!(whole.body_len, 20);
    }

    #[test]
    fn any_difference_changes_the_fingerprint() {
        let base = of(&[b"{\"order\":42}"]);
        assert_ne!(base, of(&[b"{\"order\":43}"]));
        assert_ne!(base, of(&[b"{\"order\":42}\0"]));
        assert_ne!(of(&[b""]), of(&[b"\0"]));
        let other_query = {
            let mut h = Hasher::of_head(&Request::post("/orders?x=2").body(()).unwrap());
            h.write(b"{\"order\":42}");
            h.finish()
        };
        assert_ne!(base, other_query);
    }

    /// The hash must not change between versions: shared stores compare fingerprints
    /// written by other instances (and other builds).
    #[test]
    fn the_hash_is_stable() {
        assert_eq!(of(&[b"hello"]).hash, 0x4e57_a262_e696_ff88);
    }
}
