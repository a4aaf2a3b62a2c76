//! Which requests may be deferred, and which outcomes defer them.

use crate::BoxError;
use crate::bulkhead::error::Full;
use crate::circuit_breaker::error::Open;
use crate::classify::Classify;
use crate::error::find_cause;
use crate::queue::DeferReason;
use crate::timeout::error::DeadlineExceeded;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

type KeepSyncFn = dyn Fn(&str, &str) -> bool + Send + Sync;

/// Which requests stay synchronous (are never deferred), by method, route or closure.
///
/// The default keeps reads synchronous: `GET`, `HEAD`, `OPTIONS` and `TRACE`. (A
/// `CONNECT`, or a request asking for an `Upgrade`, is never deferred whatever the
/// policy: the HTTP codec does not capture it.) A request is kept
/// synchronous if its method is in the set, its path starts with one of the route
/// prefixes, or the closure says so. Method names compare case-sensitively, as HTTP
/// methods do.
///
/// # Example
/// ```
/// use postbox::enqueue::DeferPolicy;
///
/// let policy = DeferPolicy::new()
///     .keep_sync_method("DELETE")
///     .keep_sync_route("/payments/")
///     .keep_sync_when(|_method, path| path.ends_with("/sync"));
/// assert!(policy.may_defer("POST", "/orders"));
/// assert!(!policy.may_defer("GET", "/orders"));
/// assert!(!policy.may_defer("POST", "/payments/42"));
/// assert!(!policy.may_defer("PUT", "/orders/7/sync"));
/// ```
#[derive(Clone)]
pub struct DeferPolicy {
    sync_methods: Vec<String>,
    sync_routes: Vec<String>,
    keep_sync: Vec<Arc<KeepSyncFn>>,
}

// === impl DeferPolicy ===

impl DeferPolicy {
    /// The default: `GET`, `HEAD`, `OPTIONS` and `TRACE` stay synchronous, everything
    /// else may be deferred.
    pub fn new() -> Self {
        Self {
            sync_methods: vec![
                "GET".into(),
                "HEAD".into(),
                "OPTIONS".into(),
                "TRACE".into(),
            ],
            sync_routes: Vec::new(),
            keep_sync: Vec::new(),
        }
    }

    /// A policy that keeps nothing synchronous (every method may be deferred).
    pub fn defer_all() -> Self {
        Self {
            sync_methods: Vec::new(),
            sync_routes: Vec::new(),
            keep_sync: Vec::new(),
        }
    }

    /// Keeps requests with `method` synchronous.
    pub fn keep_sync_method(mut self, method: impl Into<String>) -> Self {
        let method = method.into();
        if !self.sync_methods.contains(&method) {
            self.sync_methods.push(method);
        }
        self
    }

    /// Allows requests with `method` to be deferred (e.g. `defer_method("GET")` for a
    /// GET with side effects).
    pub fn defer_method(mut self, method: &str) -> Self {
        self.sync_methods.retain(|m| m != method);
        self
    }

    /// Keeps requests to `route` and below it synchronous, by whole path segments:
    /// `"/payments"` and `"/payments/"` both cover `/payments` and `/payments/9`, not
    /// `/paymentsX`; `"/"` covers every path.
    ///
    /// A path is compared in every spelling a server may route the same way (a client
    /// chooses it, and a request that slips past the route would be deferred): without
    /// regard to ASCII case, with `%XX`-encoded unreserved characters decoded, empty
    /// and `.` segments dropped, `..` applied, and `;` parameters cut from each
    /// segment. `//Payments;jsessionid=1/./9` and `/pay%6Dents/9` are under
    /// `"/payments"`.
    pub fn keep_sync_route(mut self, prefix: impl Into<String>) -> Self {
        self.sync_routes.push(prefix.into());
        self
    }

    /// Keeps requests synchronous when `f(method, path)` returns `true` (asked after the
    /// method and route rules). Each call adds a rule, as the method and route rules
    /// do: a request any of them matches is kept synchronous.
    pub fn keep_sync_when<F>(mut self, f: F) -> Self
    where
        F: Fn(&str, &str) -> bool + Send + Sync + 'static,
    {
        self.keep_sync.push(Arc::new(f));
        self
    }

    /// `true` if a request with `method` and `path` may be deferred.
    pub fn may_defer(&self, method: &str, path: &str) -> bool {
        if self.sync_methods.iter().any(|m| m == method) {
            return false;
        }
        if self.sync_routes.iter().any(|r| under(path, r)) {
            return false;
        }
        !self.keep_sync.iter().any(|f| f(method, path))
    }
}

impl Default for DeferPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for DeferPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferPolicy")
            .field("sync_methods", &self.sync_methods)
            .field("sync_routes", &self.sync_routes)
            .field("keep_sync_when", &self.keep_sync.len())
            .finish()
    }
}

/// Why an outcome is deferred, and the earliest it should be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trigger {
    /// Why.
    pub reason: DeferReason,
    /// Not before this long from now (the breaker's or the server's hint).
    pub not_before: Option<Duration>,
}

/// Decides whether a final outcome may be deferred (pure: no clock, no I/O).
///
/// In this order:
///
/// | outcome | trigger |
/// |---|---|
/// | [`Open`] anywhere in the error chain | [`DeferReason::CircuitOpen`], not before its `retry_after` |
/// | [`Full`] in the chain | [`DeferReason::BulkheadFull`] |
/// | [`DeadlineExceeded`] in the chain | [`DeferReason::DeadlineElapsed`] |
/// | any other outcome the classifier calls a retryable failure or overload (5xx, 429, transport errors, attempt timeouts), or a retryable ignored one with a hint (a `409` with `Retry-After`: the key's first request still runs; a replay fetches its answer) | [`DeferReason::RetriesExhausted`], not before the server's hint |
/// | anything else: success, a non-retryable answer (4xx), another ignored outcome | none: returned unchanged |
pub fn trigger<Res, C>(classifier: &C, outcome: Result<&Res, &BoxError>) -> Option<Trigger>
where
    C: Classify<Res, BoxError>,
{
    if let Err(e) = outcome {
        let e: &(dyn std::error::Error + 'static) = &**e;
        if let Some(open) = find_cause::<Open>(e) {
            return Some(Trigger {
                reason: DeferReason::CircuitOpen,
                not_before: Some(open.retry_after()),
            });
        }
        if find_cause::<Full>(e).is_some() {
            return Some(Trigger {
                reason: DeferReason::BulkheadFull,
                not_before: None,
            });
        }
        if find_cause::<DeadlineExceeded>(e).is_some() {
            return Some(Trigger {
                reason: DeferReason::DeadlineElapsed,
                not_before: None,
            });
        }
    }
    let c = classifier.classify(outcome);
    // An ignored outcome only with a hint: the idempotency layer's `409` "in progress",
    // not a classifier's "retry, but do not count it" (a cancellation, say).
    let deferred =
        c.is_retryable() && (c.is_failure() || (c.is_ignored() && c.retry_after().is_some()));
    deferred.then_some(Trigger {
        reason: DeferReason::RetriesExhausted,
        not_before: c.retry_after(),
    })
}

/// Whether `path` is `route` or below it, by whole segments, in any spelling of
/// `path` (see [`DeferPolicy::keep_sync_route`]).
fn under(path: &str, route: &str) -> bool {
    let route = route.trim_end_matches('/').as_bytes();
    let matches = |path: &[u8]| {
        path.get(..route.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(route))
            && matches!(path.get(route.len()), None | Some(b'/'))
    };
    // As written, or rewritten: a server that does not apply `..` routes
    // `/payments/..` to the payments. Only a path that could be spelt otherwise is
    // rewritten (an allocation).
    matches(path.as_bytes())
        || ((path.contains(['%', ';']) || path.contains("//") || path.contains("/."))
            && matches(canonical_path(path).as_bytes()))
}

/// `path` with its `%XX`-encoded unreserved characters decoded, its empty and `.`
/// segments dropped, its `..` segments applied, and each segment's `;` parameters cut.
fn canonical_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |j: usize| bytes.get(j).and_then(|&b| char::from(b).to_digit(16));
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2))
            && let c = (h * 16 + l) as u8
            && (c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~'))
        {
            decoded.push(c);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8_lossy(&decoded);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        let segment = segment.split(';').next().unwrap_or_default();
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// The path of a URI string (`https://host/a/b?q` → `/a/b`; `/a?q` → `/a`). A `://`
/// is a scheme's only before the first `/`, `?` or `#`: `/a?next=https://x` is `/a`.
pub(crate) fn path_of(uri: &str) -> &str {
    let scheme_end = uri
        .find("://")
        .filter(|&i| !uri[..i].contains(['/', '?', '#']));
    let rest = match scheme_end {
        Some(i) => {
            let after = &uri[i + 3..];
            // The authority ends at the first `/`, `?` or `#`.
            match after.find(['/', '?', '#']) {
                Some(j) if after[j..].starts_with('/') => &after[j..],
                _ => "/",
            }
        }
        None => uri,
    };
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    &rest[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::ErrorClassifier;

    fn err(e: impl Into<BoxError>) -> BoxError {
        e.into()
    }

    /// A keep-sync route holds in every spelling a server may route the same way: a
    /// client that wrote `//payments/1` or `/pay%6Dents/1` got its payment deferred.
    #[test]
    fn a_keep_sync_route_holds_in_every_spelling_of_the_path() {
        let policy = DeferPolicy::new().keep_sync_route("/payments");
        for path in [
            "/payments",
            "/payments/9",
            "//payments/9",
            "/payments;jsessionid=x/9",
            "/pay%6Dents/9",
            "/PAYMENTS/9",
            "/./payments/9",
            "/orders/../payments/9",
            "/payments/",
            "/payments/..",
            "/payments/9/../../orders",
            "/payments/%2E%2E",
        ] {
            assert!(!policy.may_defer("POST", path), "{path} was deferrable");
        }
        for path in [
            "/paymentsX",
            "/orders/9",
            "/pay%2Fments",
            "/orders/payments",
            "/",
        ] {
            assert!(
                policy.may_defer("POST", path),
                "{path} was kept synchronous"
            );
        }
        assert!(
            !DeferPolicy::new()
                .keep_sync_route("/")
                .may_defer("POST", "/x")
        );
        assert!(
            !DeferPolicy::new()
                .keep_sync_route("/")
                .may_defer("POST", "/")
        );
    }

    /// A second `keep_sync_when` adds to the first (as methods and routes do). It
    /// replaced it: the first rule's requests, a payment say, were deferred.
    #[test]
    fn every_keep_sync_when_rule_applies() {
        let policy = DeferPolicy::new()
            .keep_sync_when(|_, path| path.starts_with("/pay"))
            .keep_sync_when(|method, _| method == "PATCH");
        assert!(
            !policy.may_defer("POST", "/pay/1"),
            "the first rule was lost"
        );
        assert!(!policy.may_defer("PATCH", "/orders/1"));
        assert!(policy.may_defer("POST", "/orders"));
    }

    #[test]
    fn own_rejections_and_deadlines_trigger() {
        let c = ErrorClassifier::new();
        let open = err(Open::new(Duration::from_secs(3)));
        let t = trigger::<(), _>(&c, Err(&open)).unwrap();
        assert_eq!(t.reason, DeferReason::CircuitOpen);
        assert_eq!(t.not_before, Some(Duration::from_secs(3)));
        let full = err(Full::new(1, 0));
        assert_eq!(
            trigger::<(), _>(&c, Err(&full)).unwrap().reason,
            DeferReason::BulkheadFull
        );
        let late = err(DeadlineExceeded::new(Duration::from_secs(1), false));
        assert_eq!(
            trigger::<(), _>(&c, Err(&late)).unwrap().reason,
            DeferReason::DeadlineElapsed
        );
    }

    #[test]
    fn retryable_failures_trigger_successes_do_not() {
        let c = ErrorClassifier::new();
        let reset = err(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(
            trigger::<(), _>(&c, Err(&reset)).unwrap().reason,
            DeferReason::RetriesExhausted
        );
        assert_eq!(trigger::<(), _>(&c, Ok(&())), None);
    }

    /// A `409` with `Retry-After` (the key's first request still runs at the
    /// dependency) is deferred, not before the hint: the replay, with the same key,
    /// fetches the first request's answer. A plain `409` is the caller's answer.
    #[cfg(feature = "http")]
    #[test]
    fn a_request_still_in_progress_is_deferred_after_its_hint() {
        let c = crate::classify::HttpClassifier::new();
        let conflict = |after: Option<&str>| {
            let mut b = http::Response::builder().status(409);
            if let Some(a) = after {
                b = b.header(http::header::RETRY_AFTER, a);
            }
            b.body(()).unwrap()
        };
        let t = trigger(&c, Ok(&conflict(Some("3")))).unwrap();
        assert_eq!(t.reason, DeferReason::RetriesExhausted);
        assert_eq!(t.not_before, Some(Duration::from_secs(3)));
        assert_eq!(trigger(&c, Ok(&conflict(None))), None);
        // A classifier's "retry, but count it nowhere" without a hint (a cancellation)
        // is the caller's answer, not deferred.
        let uncounted = |_: Result<&(), &BoxError>| {
            crate::classify::Classification::ignored().with_retryable(true)
        };
        assert_eq!(trigger(&uncounted, Ok(&())), None);
    }

    #[test]
    fn policy_keeps_reads_synchronous_by_default() {
        let p = DeferPolicy::default();
        for m in ["GET", "HEAD", "OPTIONS", "TRACE"] {
            assert!(!p.may_defer(m, "/"));
        }
        assert!(p.may_defer("POST", "/"));
        assert!(p.clone().defer_method("GET").may_defer("GET", "/"));
        assert!(DeferPolicy::defer_all().may_defer("GET", "/"));
    }

    #[test]
    fn path_of_strips_scheme_authority_and_query() {
        assert_eq!(path_of("https://h:1/a/b?q=1"), "/a/b");
        assert_eq!(path_of("https://h"), "/");
        assert_eq!(path_of("/a#x"), "/a");
        assert_eq!(path_of("/pkg.Svc/Call"), "/pkg.Svc/Call");
    }

    /// A `://` in the query is not a scheme: the typed flavour's relative URIs kept
    /// their real path out of the route rules (`/payments/1?cb=https://x` read as `/`).
    #[test]
    fn path_of_ignores_a_scheme_in_the_query() {
        assert_eq!(path_of("/payments/1?cb=https://x/y"), "/payments/1");
        assert_eq!(path_of("/a#https://x/y"), "/a");
        assert_eq!(path_of("https://h/p?cb=https://x/y"), "/p");
        // The authority ends at a query too: `https://h?cb=/payments/1` is `/`.
        assert_eq!(path_of("https://h?cb=/payments/1"), "/");
        assert_eq!(path_of("https://h#/payments/1"), "/");
        let policy = DeferPolicy::new().keep_sync_route("/payments");
        assert!(!policy.may_defer("POST", path_of("/payments/1?cb=https://x/y")));
    }

    /// Route rules match whole segments: `/payments/` also keeps `POST /payments`
    /// synchronous (a plain prefix did not), and neither covers `/paymentsX`.
    #[test]
    fn routes_match_whole_segments() {
        for route in ["/payments", "/payments/"] {
            let policy = DeferPolicy::new().keep_sync_route(route);
            for path in ["/payments", "/payments/", "/payments/9"] {
                assert!(!policy.may_defer("POST", path), "{route} covers {path}");
            }
            for path in ["/paymentsX", "/pay", "/orders"] {
                assert!(policy.may_defer("POST", path), "{route} leaves {path}");
            }
        }
        let all = DeferPolicy::new().keep_sync_route("/");
        assert!(!all.may_defer("POST", "/orders"));
    }
}
