//! The [`Replayer`]: a worker that delivers deferred requests once their dependency is
//! back.

use super::clock::wall_now;
use super::codec::RequestCodec;
use crate::BoxError;
use crate::bulkhead::error::Full;
use crate::circuit_breaker::error::Open;
use crate::classify::{Classification, Classify, ErrorClassifier};
use crate::clock::later;
use crate::error::{ConfigError, find_cause};
use crate::queue::{LeaseToken, Leased, Queue, QueueError};
use crate::timeout::error::{BodyDeadlineExceeded, DeadlineExceeded};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::{Instant, sleep_until};
use tower_service::Service;

/// What to do with a message after one replay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// It was delivered: ack it.
    Delivered,
    /// A retryable failure: try again later, not before `after` (the server's hint) and
    /// not before the replayer's backoff.
    Retry {
        /// The server's hint, if any.
        after: Option<Duration>,
        /// What went wrong (kept in the dead letter if attempts run out).
        reason: String,
    },
    /// The circuit breaker rejected the replay: put it back until `retry_after`, and
    /// hold back its destination's messages for that long.
    CircuitOpen {
        /// When the breaker admits a probe again.
        retry_after: Duration,
    },
    /// One of our own limits turned the replay away before it reached the dependency
    /// (a full bulkhead, a deadline already spent): put it back after the backoff,
    /// without counting an attempt.
    Rejected {
        /// What turned it away.
        reason: String,
    },
    /// A permanent failure (e.g. a `4xx`): dead-letter it.
    Permanent {
        /// Why (kept in the dead letter).
        reason: String,
    },
}

/// Judges the outcome of one replay.
///
/// Implemented by [`ClassifierJudge`] (any service, via a classifier), [`HttpJudge`]
/// (HTTP responses: a non-retryable `4xx` is permanent) and closures
/// `Fn(Result<&Res, &E>) -> Verdict`.
pub trait Judge<Res, E> {
    /// The verdict on one outcome.
    fn judge(&self, outcome: Result<&Res, &E>) -> Verdict;
}

impl<F, Res, E> Judge<Res, E> for F
where
    F: Fn(Result<&Res, &E>) -> Verdict,
{
    fn judge(&self, outcome: Result<&Res, &E>) -> Verdict {
        self(outcome)
    }
}

/// Judges with a [`Classify`] implementation:
///
/// | outcome | verdict |
/// |---|---|
/// | [`Open`] in the error chain | [`Verdict::CircuitOpen`] |
/// | [`Full`], or a [`DeadlineExceeded`] that expired before the call, in the chain | [`Verdict::Rejected`] (our own limits turned it away: not counted) |
/// | a [`DeadlineExceeded`] that expired during the call | [`Verdict::Retry`] (it may have reached the dependency) |
/// | classified retryable | [`Verdict::Retry`] with the classification's hint |
/// | a gRPC `INTERNAL` or `UNKNOWN` status (with `grpc`) classified a failure not to retry, without a negative pushback | [`Verdict::Retry`] (a replay carries its idempotency key: as after an HTTP `500`) |
/// | an error, or a response classified as a failure, not retryable | [`Verdict::Permanent`] |
/// | any other response | [`Verdict::Delivered`] |
#[derive(Debug, Clone, Copy, Default)]
pub struct ClassifierJudge<C> {
    classifier: C,
}

impl<C> ClassifierJudge<C> {
    /// Judges with `classifier`.
    pub const fn new(classifier: C) -> Self {
        Self { classifier }
    }
}

impl<C, Res> Judge<Res, BoxError> for ClassifierJudge<C>
where
    C: Classify<Res, BoxError>,
{
    fn judge(&self, outcome: Result<&Res, &BoxError>) -> Verdict {
        if let Some(v) = own_rejection(outcome) {
            return v;
        }
        let c = self.classifier.classify(outcome);
        #[cfg(feature = "grpc")]
        if let Err(e) = outcome
            && let Some(v) = grpc_failure_to_replay(&c, e)
        {
            return v;
        }
        from_classification(c, outcome.err().map(ToString::to_string))
    }
}

fn own_rejection<Res>(outcome: Result<&Res, &BoxError>) -> Option<Verdict> {
    let e: &(dyn std::error::Error + 'static) = &**outcome.err()?;
    if let Some(open) = find_cause::<Open>(e) {
        return Some(Verdict::CircuitOpen {
            retry_after: open.retry_after(),
        });
    }
    let before_call = find_cause::<DeadlineExceeded>(e).map(DeadlineExceeded::expired_before_call);
    if find_cause::<Full>(e).is_some() || before_call == Some(true) {
        return Some(Verdict::Rejected {
            reason: e.to_string(),
        });
    }
    // The deadline passed while the call ran, or while its answer's body was read: it
    // may have reached the dependency, and a later replay may get through. (The
    // classifiers call both "not retryable", as the call's budget is spent; the
    // replay's next attempt has a budget of its own.)
    if before_call == Some(false) || find_cause::<BodyDeadlineExceeded>(e).is_some() {
        return Some(Verdict::Retry {
            after: None,
            reason: e.to_string(),
        });
    }
    None
}

/// A gRPC `INTERNAL` or `UNKNOWN` the classifier called a failure not to retry (a
/// server's bug during a deploy, a transport failure whose cause the status does not
/// carry): "not retried"
/// holds for the synchronous call, which may have taken effect; a replay carries its
/// idempotency key, and a later one may get through, as after an HTTP `500`. Not when
/// the server said not to, with a negative pushback (`max_attempts` bounds the rest).
#[cfg(feature = "grpc")]
fn grpc_failure_to_replay(c: &Classification, error: &BoxError) -> Option<Verdict> {
    if !c.is_failure() || c.is_retryable() {
        return None;
    }
    let s = find_cause::<tonic::Status>(&**error)?;
    if !matches!(s.code(), tonic::Code::Internal | tonic::Code::Unknown) {
        return None;
    }
    match crate::classify::grpc::retry_pushback(s.metadata().as_ref()) {
        Some(Err(())) => None,
        hint => Some(Verdict::Retry {
            after: hint.and_then(Result::ok),
            reason: error.to_string(),
        }),
    }
}

fn from_classification(c: Classification, error: Option<String>) -> Verdict {
    if c.is_retryable() {
        return Verdict::Retry {
            after: c.retry_after(),
            reason: error.unwrap_or_else(|| format!("{:?} response", c.class())),
        };
    }
    match error {
        Some(e) => Verdict::Permanent { reason: e },
        None if c.is_failure() => Verdict::Permanent {
            reason: "response classified as a permanent failure".into(),
        },
        None => Verdict::Delivered,
    }
}

#[cfg(feature = "http")]
pub use self::http_judge::HttpJudge;

#[cfg(feature = "http")]
mod http_judge {
    use super::{Judge, Verdict, from_classification, own_rejection};
    use crate::BoxError;
    use crate::classify::{Classify, HttpClassifier};
    use http::{Response, StatusCode};

    /// Judges HTTP replays with an [`HttpClassifier`]: like
    /// [`ClassifierJudge`](super::ClassifierJudge), and a `4xx` that is not retryable
    /// (anything but `408`, `429` and a `409` with `Retry-After` by default) is
    /// [`Verdict::Permanent`]. So is a
    /// redirect (`3xx` but `303 See Other` and `304 Not Modified`): the replayer does
    /// not follow it, and a `307`/`308` means the request was not applied, so the
    /// message goes to the dead letters (with the `Location`) instead of being acked
    /// as delivered.
    #[derive(Debug, Clone, Default)]
    pub struct HttpJudge {
        classifier: HttpClassifier,
    }

    impl HttpJudge {
        /// Judges with the default [`HttpClassifier`].
        pub fn new() -> Self {
            Self::default()
        }

        /// Judges with `classifier`.
        pub fn with_classifier(classifier: HttpClassifier) -> Self {
            Self { classifier }
        }
    }

    impl<B> Judge<Response<B>, BoxError> for HttpJudge {
        fn judge(&self, outcome: Result<&Response<B>, &BoxError>) -> Verdict {
            if let Some(v) = own_rejection(outcome) {
                return v;
            }
            let c = self.classifier.classify(outcome);
            if let Ok(res) = outcome {
                let status = res.status();
                if status.is_redirection()
                    && status != StatusCode::SEE_OTHER
                    && status != StatusCode::NOT_MODIFIED
                {
                    // Not followed here, and a `307`/`308` (or `301`/`302`/`300`) means
                    // the request was not applied: acking it would lose the message.
                    // Its credentials redacted (a signed URL's `X-Amz-Signature`): the
                    // reason is logged and stored with the dead letter. Redacted whole,
                    // then cut (cut first, a long userinfo would lose its `@`).
                    let to = res
                        .headers()
                        .get(http::header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .map_or_else(
                            || "nowhere".to_owned(),
                            |l| format!("{:?}", crate::queue::envelope::RedactedUri(l)),
                        );
                    let to = match to.char_indices().nth(256) {
                        Some((cut, _)) => &to[..cut],
                        None => &to,
                    };
                    return Verdict::Permanent {
                        reason: format!("redirected with {status} to {to}, not followed"),
                    };
                }
                // A `409` with a `Retry-After` is a conflict that ends (the
                // idempotency layer's "request in progress" for this key): retried,
                // unless the classifier was told what a `409` is.
                if status == StatusCode::CONFLICT
                    && !self.classifier.overrides(status, res.headers())
                    && let Some(after) = crate::classify::http::retry_after(
                        res.headers(),
                        std::time::SystemTime::now(),
                    )
                {
                    return Verdict::Retry {
                        after: Some(after),
                        reason: format!("answered {status} (in progress)"),
                    };
                }
                if !c.is_retryable() && res.status().is_client_error() {
                    return Verdict::Permanent {
                        reason: format!("rejected with {}", res.status()),
                    };
                }
                if c.is_retryable() {
                    return Verdict::Retry {
                        after: c.retry_after(),
                        reason: format!("answered {}", res.status()),
                    };
                }
            }
            from_classification(c, outcome.err().map(ToString::to_string))
        }
    }
}

/// The default cap on a dependency's `Retry-After` when the replayer puts a message
/// back: an hour. A longer hint (a bogus one, or a quota that resets tomorrow) is
/// clamped to it, so a message is never parked for longer on the dependency's word.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The replayer's settings (see the setters on [`Replayer`] for defaults).
#[derive(Debug, Clone)]
pub(crate) struct ReplayConfig {
    pub(crate) concurrency: usize,
    pub(crate) lease_batch: usize,
    pub(crate) lease_for: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) max_retry_after: Duration,
    pub(crate) jitter: bool,
    pub(crate) ack_batch: usize,
    pub(crate) ack_interval: Duration,
    pub(crate) grace: Duration,
    pub(crate) seed: Option<u64>,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            lease_batch: 64,
            lease_for: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            max_attempts: 10,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            jitter: true,
            ack_batch: 64,
            ack_interval: Duration::from_millis(100),
            grace: Duration::from_secs(10),
            seed: None,
        }
    }
}

impl ReplayConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let nonzero = [
            ("replay.concurrency", self.concurrency == 0),
            ("replay.lease_batch", self.lease_batch == 0),
            ("replay.ack_batch", self.ack_batch == 0),
            ("replay.max_attempts", self.max_attempts == 0),
            ("replay.lease_for", self.lease_for.is_zero()),
            ("replay.poll_interval", self.poll_interval.is_zero()),
        ];
        if let Some((field, _)) = nonzero.iter().find(|(_, bad)| *bad) {
            return Err(ConfigError::new(*field, "must be greater than zero"));
        }
        if self.ack_interval > self.lease_for / 2 {
            return Err(ConfigError::new(
                "replay.ack_interval",
                "must be at most half of lease_for (a replay must end that long before \
                 its lease does, for its ack to arrive in time)",
            ));
        }
        if self.backoff_base > self.backoff_max {
            return Err(ConfigError::new(
                "replay.backoff",
                "base must not exceed max",
            ));
        }
        Ok(())
    }

    /// How long one replay may run from its lease: the lease less a margin (a tenth of
    /// the lease for the queue's round trip, plus `ack_interval`, the most its ack may
    /// wait for a batch; so at least two fifths of the lease), so that its verdict is
    /// settled while the lease still holds and the message is never leased again, and
    /// replayed twice at once, while it runs.
    pub(crate) fn replay_limit(&self) -> Duration {
        let margin = (self.lease_for / 10).saturating_add(self.ack_interval);
        self.lease_for.saturating_sub(margin)
    }

    /// Exponential backoff after `attempts` deliveries: `base * 2^(attempts-1)`, capped
    /// at `max`; with jitter, uniformly in `[half, full]` of that.
    fn backoff(&self, attempts: u32, rng: &mut fastrand::Rng) -> Duration {
        let exp = attempts.saturating_sub(1).min(32);
        let full = self
            .backoff_base
            .saturating_mul(1u32 << exp.min(31))
            .min(self.backoff_max);
        if !self.jitter || full.is_zero() {
            return full;
        }
        let half = full / 2;
        let nanos = (full - half).as_nanos().min(u128::from(u64::MAX)) as u64;
        half + Duration::from_nanos(rng.u64(..=nanos))
    }
}

/// Delivers deferred requests: leases due messages, replays each through a service with
/// its original idempotency key, and acks, backs off or dead-letters it.
///
/// Configure with the setters, then [`spawn`](Self::spawn) it on the current tokio
/// runtime; the returned [`ReplayerHandle`] reports progress and shuts it down.
///
/// # What happens to a leased message
/// * **expired** (`expires_at` passed) or **leased more than `max_attempts` times** →
///   dead-lettered without a replay;
/// * its request cannot be rebuilt → dead-lettered;
/// * otherwise replayed through the service and judged ([`Judge`]):
///   [`Delivered`](Verdict::Delivered) → acked (in batches of `ack_batch`, or after
///   `ack_interval`); [`Retry`](Verdict::Retry) → back to the queue not before
///   `max(backoff, hint)`, or dead-lettered once it has had `max_attempts` deliveries;
///   [`CircuitOpen`](Verdict::CircuitOpen) → back to the queue until the breaker's
///   `retry_after` (at least the backoff base) *without counting the attempt*
///   ([`Queue::release`]), and the messages of the same destination
///   ([`Envelope::destination`](crate::queue::Envelope::destination), the authority a
///   per-host breaker is keyed by) leased until then are held back uncalled to then
///   ([`ReplayStats::held_back`]), while other destinations' are replayed;
///   [`Rejected`](Verdict::Rejected) by our own limit (a full bulkhead, a deadline
///   spent before the call) → back to the queue after the backoff, uncounted, and
///   the messages of its destination are held back in the same way for the backoff of
///   the rejections in a row (at least `poll_interval`, at most 30 s), until a replay
///   gets through; other destinations' are replayed (the config stack's bulkhead is
///   per host);
///   [`Permanent`](Verdict::Permanent) → dead-lettered.
///
/// The queue counts every lease as an attempt, except a replay rejected by an open
/// breaker before any of its attempts reached the dependency (every backend in this
/// crate implements `release` uncounted; a `Queue` of your own that keeps the default
/// counts it). A retry layer inside notes an attempt that reached the dependency on
/// the request's [`AttemptLog`](crate::retry::AttemptLog): a replay whose own failed
/// probe opened the breaker its retry then met still counts.
///
/// An ack, retry, release or dead letter that finds the queue
/// [`Unavailable`](QueueError::Unavailable) is tried again every `poll_interval` (at
/// most a twentieth of `lease_for`; and
/// during the shutdown's grace period, and once more at its end) for as long as the lease may still be current (`lease_for`
/// since the first try); after that the lease expires and the message is leased again.
///
/// # Which service
/// Replay through the stack *inside* the enqueue layer (deadline, retry, breaker,
/// bulkhead, timeouts, client), not through [`EnqueueFallback`](super::EnqueueFallback)
/// itself: a replay that fails is put back by the replayer, never enqueued again.
pub struct Replayer<Q, S, K, J> {
    queue: Arc<Q>,
    service: S,
    codec: K,
    judge: J,
    config: ReplayConfig,
    /// [`name`](Replayer::name): the `queue` label of its metrics.
    name: metrics::SharedString,
}

// === impl Replayer ===

impl<Q, S, K> Replayer<Q, S, K, ClassifierJudge<ErrorClassifier>> {
    /// Replays messages of `queue` through `service`, rebuilding requests with `codec`,
    /// judged by a [`ClassifierJudge`] over an [`ErrorClassifier`]: every response is
    /// a delivery, a `503` too. For HTTP use [`Replayer::http`] (or
    /// [`with_judge`](Self::with_judge) with an [`HttpJudge`]), which reads the status.
    pub fn new(queue: Arc<Q>, service: S, codec: K) -> Self {
        Self {
            queue,
            service,
            codec,
            judge: ClassifierJudge::new(ErrorClassifier::new()),
            config: ReplayConfig::default(),
            name: metrics::SharedString::const_str(""),
        }
    }
}

#[cfg(feature = "http")]
impl<Q, S> Replayer<Q, S, super::HttpCodec, HttpJudge> {
    /// Replays HTTP messages (as `http::Request<BufferedBody<B>>`) through `service`,
    /// judged by an [`HttpJudge`].
    pub fn http(queue: Arc<Q>, service: S) -> Self {
        Self {
            queue,
            service,
            codec: super::HttpCodec::new(),
            judge: HttpJudge::new(),
            config: ReplayConfig::default(),
            name: metrics::SharedString::const_str(""),
        }
    }
}

impl<Q, S, K, J> Replayer<Q, S, K, J> {
    /// Judges outcomes with `judge`.
    pub fn with_judge<J2>(self, judge: J2) -> Replayer<Q, S, K, J2> {
        Replayer {
            queue: self.queue,
            service: self.service,
            codec: self.codec,
            judge,
            config: self.config,
            name: self.name,
        }
    }

    /// Names the replayer in its metrics (the `queue` label of `postbox_replayed_total`,
    /// `postbox_dead_lettered_total` and `postbox_queue_depth`; empty by default) and
    /// its dead-letter events: several replayers in one process, each on its own queue, would
    /// otherwise report into the same series (the depth gauge showing whichever
    /// reported last).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = metrics::SharedString::from(Arc::<str>::from(name.into()));
        self
    }

    /// Every setting but the seed from `config` (a file's `[client.replay]`, see
    /// [`ClientConfig::replayer`](crate::config::ClientConfig::replayer)).
    #[cfg(feature = "config")]
    pub(crate) fn with_config(mut self, config: ReplayConfig) -> Self {
        self.config = ReplayConfig {
            seed: self.config.seed,
            ..config
        };
        self
    }

    /// At most `n` replays in flight (default 16).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// Lease at most `n` messages at a time (default 64; never more than free
    /// concurrency).
    pub fn lease_batch(mut self, n: usize) -> Self {
        self.config.lease_batch = n;
        self
    }

    /// How long a lease lasts (default 60 s): a message not settled by then returns
    /// to pending.
    ///
    /// A replay still running when a tenth of the lease plus `ack_interval` is left is
    /// cut off: a retryable failure, counted, once it was called (it may
    /// have reached the dependency); uncounted, like a rejection, if the service was
    /// still not ready. So the lease never runs out under a running replay, and a
    /// message is never replayed twice at once. Keep the service's deadline under 90%
    /// of the lease less `ack_interval`.
    pub fn lease_for(mut self, d: Duration) -> Self {
        self.config.lease_for = d;
        self
    }

    /// How often an idle replayer looks for due messages (default 1 s).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.config.poll_interval = d;
        self
    }

    /// A message is dead-lettered after `n` deliveries that did not succeed
    /// (default 10).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.config.max_attempts = n;
        self
    }

    /// Backoff after a retryable failure: `base * 2^(attempts-1)`, capped at `max`
    /// (defaults 1 s and 5 min), and never shorter than the
    /// [`poll_interval`](Self::poll_interval): a zero base must not make a failing
    /// message burn its attempts in a hot loop.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.config.backoff_base = base;
        self.config.backoff_max = max;
        self
    }

    /// Honour a dependency's hint (`Retry-After`, `grpc-retry-pushback-ms`) up to `max`
    /// (default [`DEFAULT_MAX_RETRY_AFTER`], an hour): a message is put back not before
    /// `max(backoff, min(hint, max))`. A longer hint is clamped, not obeyed: the
    /// message is tried again after `max`, and a time to live that the clamped wait
    /// would pass still dead-letters it at once. `Duration::ZERO` ignores hints.
    ///
    /// Unlike the retry layer's `max_retry_after`, which ends the retries of a call
    /// a caller is waiting on, a deferred message has no caller waiting: it waits.
    /// (An open breaker's own `retry_after` is not a hint from the dependency and is
    /// not clamped. The first wait, when the message is deferred, is capped by
    /// [`EnqueueConfig::max_retry_after`](super::EnqueueConfig::max_retry_after).)
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.config.max_retry_after = max;
        self
    }

    /// Whether the backoff is jittered (uniformly within its upper half; default on).
    pub fn jitter(mut self, on: bool) -> Self {
        self.config.jitter = on;
        self
    }

    /// Seeds the jitter's random number generator (deterministic tests).
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = Some(seed);
        self
    }

    /// Ack in batches of up to `n` (default 64), flushed at least every `interval`
    /// (default 100 ms; at most half of `lease_for`) and whenever the replayer goes
    /// idle.
    pub fn ack_batch(mut self, n: usize, interval: Duration) -> Self {
        self.config.ack_batch = n;
        self.config.ack_interval = interval;
        self
    }

    /// On shutdown, wait up to `d` (default 10 s) for replays in flight, and for acks,
    /// retries, releases and dead letters the queue refused (tried again every
    /// `poll_interval` meanwhile); the leases of replays still running then return to
    /// the queue.
    pub fn grace(mut self, d: Duration) -> Self {
        self.config.grace = d;
        self
    }

    /// Starts the worker on the current tokio runtime.
    ///
    /// `Req` is the request type the service takes and the codec rebuilds; it is
    /// usually inferred.
    ///
    /// # Errors
    /// An invalid configuration (a zero concurrency, batch, attempt count, lease or
    /// poll interval, a backoff base above its max, or an `ack_interval` over half of
    /// `lease_for`).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn<Req>(self) -> Result<ReplayerHandle, ConfigError>
    where
        Q: Queue,
        S: Service<Req> + Clone + Send + 'static,
        S::Future: Send,
        S::Response: Send,
        S::Error: Into<BoxError> + Send,
        K: RequestCodec<Req> + Send + Sync + 'static,
        J: Judge<S::Response, BoxError> + Send + Sync + 'static,
        Req: Send + 'static,
    {
        self.config.validate()?;
        let (tx, rx) = watch::channel(false);
        let stats = Arc::new(Counters::default());
        let rng = match self.config.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        let worker = Worker {
            queue: self.queue,
            service: self.service,
            codec: Arc::new(self.codec),
            judge: Arc::new(self.judge),
            config: self.config,
            name: self.name,
            stats: stats.clone(),
            rng,
            tasks: JoinSet::new(),
            in_flight: HashMap::new(),
            acks: Vec::new(),
            ack_due: None,
            unsettled: Vec::new(),
            resettle_at: None,
            open: HashMap::new(),
            last_lease: None,
            depth_at: None,
            _req: std::marker::PhantomData,
        };
        let task = tokio::spawn(worker.run(rx));
        Ok(ReplayerHandle {
            shutdown: tx,
            task: Some(task),
            stats,
        })
    }
}

impl<Q, S: fmt::Debug, K, J> fmt::Debug for Replayer<Q, S, K, J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replayer")
            .field("service", &self.service)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Counters {
    replayed: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    returned: AtomicU64,
    held_back: AtomicU64,
}

/// Counts of what a replayer did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayStats {
    /// Delivered and acked.
    pub replayed: u64,
    /// Put back after a retryable failure, or after its replay met an open breaker or
    /// a full limit of our own.
    pub retried: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
    /// Leases returned to the queue at shutdown.
    pub returned: u64,
    /// Put back uncalled and uncounted: leased while a replay to the same destination
    /// had just met an open breaker (or our own full limit), and due again when its
    /// break (or pause) ends; or handed out again by the queue while its own replay
    /// still ran here (a RabbitMQ connection that dropped, a NATS consumer made anew),
    /// and due again when that replay's lease ends.
    pub held_back: u64,
}

/// Controls a running [`Replayer`].
///
/// Dropping the handle also stops the worker gracefully, in the background.
#[derive(Debug)]
pub struct ReplayerHandle {
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<Counters>,
}

impl ReplayerHandle {
    /// What the replayer did so far.
    pub fn stats(&self) -> ReplayStats {
        let s = &self.stats;
        ReplayStats {
            replayed: s.replayed.load(Ordering::Relaxed),
            retried: s.retried.load(Ordering::Relaxed),
            dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
            returned: s.returned.load(Ordering::Relaxed),
            held_back: s.held_back.load(Ordering::Relaxed),
        }
    }

    /// Stops gracefully: no new leases; replays in flight get the grace period to
    /// finish, and settling calls the queue refused (`Unavailable`) to be taken (so a
    /// queue that stays down holds the shutdown for the whole grace period); the leases
    /// of replays still running go back to the queue (due at once, the delivery not
    /// counted: [`Queue::release`]); pending acks are flushed. Returns the final counts.
    ///
    /// # Cancel safety
    /// Dropping this future after its first poll does not cancel the shutdown: the
    /// worker goes on draining in the background.
    pub async fn shutdown(mut self) -> ReplayStats {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "replayer task failed");
        }
        self.stats()
    }
}

/// The longest pause of a destination while our own limit turns its replays away: the limit frees
/// with live traffic, so the backlog must not wait the whole backoff cap for it.
const MAX_REJECTED_PAUSE: Duration = Duration::from_secs(30);

struct Worker<Q, S, K, J, Req> {
    queue: Arc<Q>,
    service: S,
    codec: Arc<K>,
    judge: Arc<J>,
    config: ReplayConfig,
    /// The `queue` label of the metrics ([`Replayer::name`]).
    name: metrics::SharedString,
    stats: Arc<Counters>,
    rng: fastrand::Rng,
    tasks: JoinSet<Settled>,
    /// Each running replay's lease, and when its lease runs out by the wall clock.
    in_flight: HashMap<Id, InFlight>,
    acks: Vec<LeaseToken>,
    ack_due: Option<Instant>,
    /// Queue calls that found the queue unavailable, with when they first failed: tried
    /// again from `resettle_at`.
    unsettled: Vec<(Instant, Settle)>,
    resettle_at: Option<Instant>,
    /// Destinations whose replay met an open breaker or our own full limit, with until
    /// when: their messages leased before then are released to then without a call,
    /// while the rest of the backlog goes on (a per-host breaker open, or a per-host
    /// bulkhead full, for one must not stall the others).
    open: HashMap<String, Hold>,
    /// When the last lease was asked for, by tokio's clock and by the wall clock: a wall
    /// clock that moved on further meanwhile jumped.
    last_lease: Option<(Instant, std::time::SystemTime)>,
    depth_at: Option<Instant>,
    _req: std::marker::PhantomData<fn(Req)>,
}

/// A destination held back (see `Worker::open`).
#[derive(Debug, Clone, Copy)]
struct Hold {
    until: Instant,
    /// Pauses in a row of this destination for our own full limit: the next one grows
    /// with it; reset by any other verdict for the destination.
    rejected: u32,
}

/// How long a destination's rejection streak is remembered past its pause's end, for
/// a destination no replay reached again.
const REJECTED_MEMORY: Duration = Duration::from_secs(5 * 60);

/// A running replay: its lease, when that lease runs out by the wall clock, and how to
/// cut it off.
struct InFlight {
    token: LeaseToken,
    lease_ends: std::time::SystemTime,
    abort: tokio::task::AbortHandle,
    /// Cut off by the wall clock already (logged once).
    cut: bool,
    /// What settling it needs if the service panics.
    attempts: u32,
    expires_at: Option<std::time::SystemTime>,
    destination: String,
}

/// A queue call that settles leases: tried again every poll interval while the queue
/// is [`QueueError::Unavailable`], for as long as the lease could still be current.
enum Settle {
    Ack(Vec<LeaseToken>),
    /// `retry_later` if `counted`, else `release`.
    Later {
        token: LeaseToken,
        not_before: std::time::SystemTime,
        counted: bool,
        /// Released uncalled, its destination being paused (an open breaker, our own
        /// full limit).
        held_back: bool,
    },
    Dead {
        token: LeaseToken,
        reason: String,
    },
}

impl Settle {
    fn what(&self) -> &'static str {
        match self {
            Settle::Ack(_) => "ack",
            Settle::Later { counted: true, .. } => "retry later",
            Settle::Later { counted: false, .. } => "release",
            Settle::Dead { .. } => "dead-letter",
        }
    }
}

/// The result of one replay task.
struct Settled {
    token: LeaseToken,
    attempts: u32,
    expires_at: Option<std::time::SystemTime>,
    /// The message's destination, to pause if the verdict is an open breaker or our
    /// own full limit.
    destination: String,
    verdict: Verdict,
    /// An attempt of this replay reached the dependency before its retries ended on a
    /// rejection of our own (the open breaker its own failure opened): the replay then
    /// counts, so a message that always fails still reaches `max_attempts`.
    reached: bool,
}

/// Replays `req` through `svc` and judges the outcome. A replay still running at
/// `cut_off` (near the end of its lease) is dropped: not yet called (the service was not
/// ready), it is [`Verdict::Rejected`], uncounted; called, it may have reached the
/// dependency and is [`Verdict::Retry`].
async fn replay_one<S, Req, J>(mut svc: S, req: Req, judge: Arc<J>, cut_off: Instant) -> Verdict
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    J: Judge<S::Response, BoxError>,
{
    let ready = tokio::time::timeout_at(cut_off, std::future::poll_fn(|cx| svc.poll_ready(cx)));
    let out = match ready.await {
        Err(_) => {
            return Verdict::Rejected {
                reason: "the service was not ready before the end of the lease".into(),
            };
        }
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(())) => match tokio::time::timeout_at(cut_off, svc.call(req)).await {
            Err(_) => {
                return Verdict::Retry {
                    after: None,
                    reason: "the replay was still running near the end of its lease".into(),
                };
            }
            Ok(out) => out.map_err(Into::into),
        },
    };
    judge.judge(out.as_ref())
}

impl<Q, S, K, J, Req> Worker<Q, S, K, J, Req>
where
    Q: Queue,
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Into<BoxError> + Send,
    K: RequestCodec<Req> + Send + Sync + 'static,
    J: Judge<S::Response, BoxError> + Send + Sync + 'static,
    Req: Send + 'static,
{
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(concurrency = self.config.concurrency, "replayer started");
        loop {
            if *shutdown.borrow() {
                break;
            }
            while let Some(joined) = self.tasks.try_join_next_with_id() {
                self.settle(joined).await;
            }
            self.maybe_flush().await;
            if self.resettle_at.is_some_and(|at| at <= Instant::now()) {
                self.resettle().await;
            }

            let now = Instant::now();
            // Every turn, not only before a lease: a worker at its concurrency cuts off
            // a replay whose lease a wall-clock jump ended, too.
            self.cut_off_lapsed(wall_now());
            let room = self.config.concurrency.saturating_sub(self.tasks.len());
            if room > 0 {
                let max = room.min(self.config.lease_batch);
                // Read before the lease: its replays are cut off by then + the limit,
                // however long the rest of the batch takes to start.
                let cut_off = later(Instant::now(), self.config.replay_limit());
                let wall = wall_now();
                self.before_a_jump_releases(wall).await;
                self.cut_off_lapsed(wall);
                match self.queue.lease(max, self.config.lease_for, wall).await {
                    Ok(batch) if !batch.is_empty() => {
                        // A message of a paused destination (an open breaker, our own
                        // full limit) is held back to the pause's end, so it is not due
                        // again before then.
                        for leased in batch {
                            self.start(leased, cut_off).await;
                        }
                        // Also while a backlog keeps the leases coming (a burst of
                        // expired messages, settled without a task): the depth, its
                        // dead letters above all, is what shows that burst. At most
                        // once per poll interval.
                        self.report_depth().await;
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "replayer could not lease"),
                }
            }
            if self.tasks.is_empty() {
                self.flush().await;
            }
            self.report_depth().await;

            // Idle or full: wait for a replay to finish, a timer, or shutdown.
            let mut wake = later(now, self.config.poll_interval);
            if let Some(d) = self.ack_due {
                wake = wake.min(d);
            }
            if let Some(r) = self.resettle_at {
                wake = wake.min(r);
            }
            let busy = !self.tasks.is_empty();
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some(joined) = self.tasks.join_next_with_id(), if busy => self.settle(joined).await,
                () = sleep_until(wake) => {}
            }
        }
        self.drain().await;
        tracing::info!(stats = ?self.stats_snapshot(), "replayer stopped");
    }

    fn stats_snapshot(&self) -> (u64, u64, u64, u64) {
        let s = &self.stats;
        (
            s.replayed.load(Ordering::Relaxed),
            s.retried.load(Ordering::Relaxed),
            s.dead_lettered.load(Ordering::Relaxed),
            s.returned.load(Ordering::Relaxed),
        )
    }

    /// Shutdown: wait for replays in flight up to the grace period, then return the
    /// leases of the rest.
    async fn drain(&mut self) {
        let deadline = later(Instant::now(), self.config.grace);
        self.flush().await;
        // Calls the queue could not take are tried again meanwhile too, while their
        // leases may still hold (the grace period may outlast them): the grace waits
        // for them as for replays, also once the last replay has ended.
        while !self.tasks.is_empty() || !self.unsettled.is_empty() {
            let resettle = self.resettle_at.map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                // Acked at once, not batched: a replay that ended just before the
                // shutdown may have little of its lease left, and the grace period
                // may outlast it.
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.settle(joined).await;
                    self.flush().await;
                }
                () = sleep_until(resettle), if resettle < deadline => self.resettle().await,
                () = sleep_until(deadline) => break,
            }
        }
        self.tasks.abort_all();
        while let Some(joined) = self.tasks.join_next_with_id().await {
            // A task cut short stays in flight, its lease returned below; one that
            // finished or panicked meanwhile is settled (a panic logged) as usual.
            if !joined.as_ref().is_err_and(JoinError::is_cancelled) {
                self.settle(joined).await;
            }
        }
        self.flush().await;
        // One last try for calls the queue could not take: a message not settled now
        // comes back when its lease expires.
        self.resettle().await;
        // Returned uncounted: cut short by the shutdown, not judged, these replays must
        // not use up an attempt (a message on its last one would be dead-lettered at its
        // next lease without ever being judged).
        // Once the queue is found unavailable, the rest are left to their leases' end
        // (they come back then): each call would wait out the queue's own timeout, and
        // the shutdown with it.
        let now = wall_now();
        let mut down = false;
        for (_, InFlight { token, .. }) in std::mem::take(&mut self.in_flight) {
            if down {
                tracing::debug!(id = %token.id, "lease left to its end at shutdown: the queue is unavailable");
                continue;
            }
            match self.queue.release(token, now).await {
                Ok(()) => {
                    self.stats.returned.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(id = %token.id, "lease returned at shutdown");
                }
                Err(e) => {
                    down = matches!(e, QueueError::Unavailable(_));
                    log_queue_error("return a lease", &e);
                }
            }
        }
        if !down {
            self.report_depth_now().await;
        }
    }

    /// Starts the replay of `leased`, or settles it at once: expired, out of attempts,
    /// not rebuildable, or held back while its destination is paused.
    async fn start(&mut self, leased: Leased, cut_off: Instant) {
        let Leased {
            envelope,
            token,
            lease_until,
        } = leased;
        let now = wall_now();
        // The queue gave back a message whose replay still runs here (RabbitMQ returns
        // every delivery it holds when its connection drops; a NATS consumer created
        // anew): not replayed a second time beside it. Back, uncounted, once that
        // replay's lease is over.
        if let Some(running) = self.in_flight.values().find(|f| f.token.id == token.id) {
            let left = running
                .lease_ends
                .duration_since(now)
                .unwrap_or_default()
                .max(self.config.poll_interval);
            tracing::debug!(id = %token.id, ?left, "a replay of this message still runs; held back");
            self.hold_back(token, left).await;
            return;
        }
        if envelope.expires_at.is_some_and(|at| at <= now) {
            self.dead_letter(token, "expired before delivery").await;
            return;
        }
        if envelope.attempts > self.config.max_attempts {
            let reason = format!("gave up after {} attempts", envelope.attempts - 1);
            self.dead_letter(token, &reason).await;
            return;
        }
        if let Some(hold) = self.open.get(&envelope.destination) {
            let left = hold.until.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                // Not called, not counted: back when the breaker may let it through,
                // or our own limit may have room.
                tracing::trace!(id = %token.id, ?left, "destination paused; held back");
                self.hold_back(token, left).await;
                return;
            }
        }
        // The batch's earlier messages took the time (queue calls that stalled): its
        // replay would be cut off at its first poll, after the request may have gone
        // out, and counted. Back, uncounted and uncalled, for the next lease.
        if Instant::now() >= cut_off {
            tracing::debug!(id = %token.id, "the batch's cut-off passed before its turn; held back");
            self.hold_back(token, Duration::ZERO).await;
            return;
        }
        // A codec of the user's that panics on one message must not end the worker
        // (and every later replay with it): that message is dead-lettered instead.
        let codec = &*self.codec;
        let rebuilt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut req = codec.rebuild(&envelope)?;
            let log = codec.attempt_log(&mut req).unwrap_or_default();
            Ok::<_, BoxError>((req, log))
        }));
        let (req, log) = match rebuilt {
            Ok(Ok(rebuilt)) => rebuilt,
            Ok(Err(e)) => {
                let reason = format!("cannot rebuild the request: {e}");
                self.dead_letter(token, &reason).await;
                return;
            }
            Err(panic) => {
                let reason = format!("rebuilding the request panicked: {}", panic_text(&*panic));
                tracing::error!(id = %token.id, %reason, "replay codec panicked");
                self.dead_letter(token, &reason).await;
                return;
            }
        };
        tracing::debug!(id = %token.id, attempt = envelope.attempts, "replaying");
        let svc = self.service.clone();
        let judge = self.judge.clone();
        let (attempts, expires_at) = (envelope.attempts, envelope.expires_at);
        let destination = envelope.destination;
        let kept = destination.clone();
        // One log for the request (HTTP: in its extensions) and the task.
        let handle = self.tasks.spawn(async move {
            let verdict = log
                .clone()
                .scope(replay_one(svc, req, judge, cut_off))
                .await;
            Settled {
                token,
                attempts,
                expires_at,
                destination,
                verdict,
                reached: log.reached(),
            }
        });
        self.in_flight.insert(
            handle.id(),
            InFlight {
                token,
                lease_ends: lease_until,
                abort: handle,
                cut: false,
                attempts,
                expires_at,
                destination: kept,
            },
        );
    }

    /// After the wall clock jumped (further than tokio's clock moved, by more than a
    /// tenth of the lease), settles what finished and sends the acks waiting for a
    /// batch before the next lease: their leases may have run out, and the lease would
    /// hand those messages out again, replayed twice.
    async fn before_a_jump_releases(&mut self, wall: std::time::SystemTime) {
        let now = Instant::now();
        let jumped = self.last_lease.is_some_and(|(m, w)| {
            wall.duration_since(w).unwrap_or_default()
                > now.saturating_duration_since(m) + self.config.lease_for / 10
        });
        self.last_lease = Some((now, wall));
        if jumped {
            tracing::warn!("wall clock jumped: settling before the next lease");
            while let Some(joined) = self.tasks.try_join_next_with_id() {
                self.settle(joined).await;
            }
            self.flush().await;
        }
    }

    /// Cuts off the replays whose lease has run out by the wall clock: the lease asks
    /// the queue by it, and would lease their messages again, a second replay beside
    /// the first. The monotonic cut-off does that in time, unless the wall clock jumped
    /// (a suspended VM, whose monotonic clock stood still; an NTP step).
    fn cut_off_lapsed(&mut self, now: std::time::SystemTime) {
        for f in self.in_flight.values_mut() {
            if f.lease_ends <= now && !f.cut {
                tracing::warn!(id = %f.token.id, "replay cut off: its lease ran out by the wall clock");
                f.abort.abort();
                f.cut = true;
            }
        }
    }

    async fn settle(&mut self, joined: Result<(Id, Settled), JoinError>) {
        let Settled {
            token,
            attempts,
            expires_at,
            destination,
            verdict,
            reached,
        } = match joined {
            Ok((id, settled)) => {
                self.in_flight.remove(&id);
                settled
            }
            Err(e) => {
                // A replay cut off because its lease ran out by the wall clock: its
                // lease has (the message is leased again).
                let Some(f) = self.in_flight.remove(&e.id()).filter(|_| e.is_panic()) else {
                    return;
                };
                // A panicking service: judged as a failure worth retrying, with the
                // backoff and the attempt it costs, and the panic as the reason (left
                // to its lease, it came back at once, and its dead letter said nothing
                // of the panic).
                let reason = format!("the service panicked: {}", panic_text(&*e.into_panic()));
                tracing::error!(id = %f.token.id, %reason, "replay panicked");
                Settled {
                    token: f.token,
                    attempts: f.attempts,
                    expires_at: f.expires_at,
                    destination: f.destination,
                    verdict: Verdict::Retry {
                        after: None,
                        reason,
                    },
                    reached: true,
                }
            }
        };
        if !matches!(verdict, Verdict::Rejected { .. })
            && let Some(hold) = self.open.get_mut(&destination)
        {
            hold.rejected = 0;
        }
        match verdict {
            Verdict::Delivered => {
                tracing::debug!(id = %token.id, "replayed");
                self.acks.push(token);
            }
            Verdict::Retry { after, reason } => {
                // The hint comes from the dependency: honoured, up to `max_retry_after`.
                let after = after.map(|a| a.min(self.config.max_retry_after));
                self.retry_counted(token, attempts, expires_at, after, &reason)
                    .await;
            }
            Verdict::CircuitOpen { retry_after } => {
                // A zero hint means "half-open, probes busy": still back off a little, so
                // a busy half-open breaker does not burn attempts in a tight loop.
                // (At least a poll interval, also with a zero backoff base: no hot loop.)
                let pause = retry_after
                    .max(self.config.backoff_base)
                    .max(self.config.poll_interval);
                // `retry_after` may come from the dependency: never overflow.
                if self.pause_destination(destination, pause) {
                    tracing::info!(?pause, "circuit open; replay of its destination paused");
                }
                if reached {
                    let reason = "an attempt reached the dependency and failed; its retries \
                                  ended on the open circuit";
                    self.retry_counted(token, attempts, expires_at, Some(retry_after), reason)
                        .await;
                    return;
                }
                // The delivery never reached the dependency: it does not count.
                self.retry_later(token, pause, false).await;
            }
            Verdict::Rejected { reason } if reached => {
                let reason = format!(
                    "an attempt reached the dependency and failed; its retries ended on: {reason}"
                );
                self.retry_counted(token, attempts, expires_at, None, &reason)
                    .await;
            }
            Verdict::Rejected { reason } => {
                let delay = self
                    .config
                    .backoff(attempts.max(1), &mut self.rng)
                    .max(self.config.poll_interval);
                tracing::debug!(id = %token.id, ?delay, %reason, "replay turned away by our own limit; not counted");
                // Our own limit is full (a bulkhead shared with live traffic; one per
                // host in the config stack): replaying more of this destination now
                // would only turn those away too. Its messages are held back, longer
                // while it stays full; the other destinations go on. One step per
                // pause, not per message: a batch turned away is one step.
                let now = Instant::now();
                let hold = self.open.get(&destination).copied();
                let until = match hold {
                    Some(h) if h.until > now => h.until,
                    _ => {
                        // A streak forgotten past its memory starts again.
                        let rejected = hold
                            .filter(|h| now.saturating_duration_since(h.until) < REJECTED_MEMORY)
                            .map_or(0, |h| h.rejected)
                            .saturating_add(1);
                        let pause = self
                            .config
                            .backoff(rejected, &mut self.rng)
                            .min(MAX_REJECTED_PAUSE)
                            .max(self.config.poll_interval);
                        self.pause_destination(destination.clone(), pause);
                        if let Some(h) = self.open.get_mut(&destination) {
                            h.rejected = rejected;
                        }
                        tracing::debug!(
                            ?pause,
                            "replays turned away by our own limit; their destination paused"
                        );
                        later(now, pause)
                    }
                };
                // Back no sooner than its destination's pause ends: earlier, it would
                // only be leased and held back again.
                let delay = delay.max(until.saturating_duration_since(now));
                self.retry_later(token, delay, false).await;
            }
            Verdict::Permanent { reason } => self.dead_letter(token, &reason).await,
        }
    }

    /// Holds back `destination`'s messages for `pause` from now (unless a longer pause
    /// is on); `true` if the pause was set or lengthened.
    fn pause_destination(&mut self, destination: String, pause: Duration) -> bool {
        let now = Instant::now();
        let until = later(now, pause);
        self.open.retain(|_, h| {
            h.until > now
                || (h.rejected > 0 && now.saturating_duration_since(h.until) < REJECTED_MEMORY)
        });
        let hold = self.open.entry(destination).or_insert(Hold {
            until: now,
            rejected: 0,
        });
        if hold.until >= until {
            return false;
        }
        hold.until = until;
        true
    }

    /// A failed delivery that counts: dead-lettered after `max_attempts` (or if it
    /// would expire before its next try), else back to the queue not before
    /// `max(backoff, after)`.
    async fn retry_counted(
        &mut self,
        token: LeaseToken,
        attempts: u32,
        expires_at: Option<std::time::SystemTime>,
        after: Option<Duration>,
        reason: &str,
    ) {
        if attempts >= self.config.max_attempts {
            let reason = format!("gave up after {attempts} attempts: {reason}");
            self.dead_letter(token, &reason).await;
            return;
        }
        // At least a poll interval, as the other ways back to the queue: with a zero
        // backoff base a failing message was leased again at once and burnt its
        // attempts within milliseconds.
        let backoff = self
            .config
            .backoff(attempts, &mut self.rng)
            .max(self.config.poll_interval);
        let delay = backoff.max(after.unwrap_or_default());
        if expires_at.is_some_and(|at| crate::queue::saturating_add(wall_now(), delay) >= at) {
            // Never tried again: dead now, not after waiting out the delay.
            let reason = format!("expires before its next try (in {delay:?}): {reason}");
            self.dead_letter(token, &reason).await;
            return;
        }
        tracing::debug!(id = %token.id, ?delay, %reason, "replay failed; retrying later");
        self.retry_later(token, delay, true).await;
    }

    /// Back to the queue for `delay`; `counted: false` does not count the delivery
    /// ([`Queue::release`]).
    async fn retry_later(&mut self, token: LeaseToken, delay: Duration, counted: bool) {
        // `delay` may hold the dependency's Retry-After, of any size.
        let not_before = crate::queue::saturating_add(wall_now(), delay);
        let call = Settle::Later {
            token,
            not_before,
            counted,
            held_back: false,
        };
        self.try_settle(call, Instant::now()).await;
    }

    /// Back to the queue for `delay`, uncounted and uncalled: its destination's breaker
    /// is open (or its limit full), or its own replay still runs.
    async fn hold_back(&mut self, token: LeaseToken, delay: Duration) {
        let call = Settle::Later {
            token,
            not_before: crate::queue::saturating_add(wall_now(), delay),
            counted: false,
            held_back: true,
        };
        self.try_settle(call, Instant::now()).await;
    }

    async fn dead_letter(&mut self, token: LeaseToken, reason: &str) {
        let reason = reason.to_owned();
        self.try_settle(Settle::Dead { token, reason }, Instant::now())
            .await;
    }

    /// Makes the queue call `call`, first tried at `since`. If the queue is unavailable
    /// and the lease may still be current (less than `lease_for` since the first try),
    /// keeps it to try again; so a blip of the queue does not turn a settled delivery
    /// into a replay (an ack) or an extra counted attempt (a retry, a dead letter).
    /// Returns whether the queue was available.
    async fn try_settle(&mut self, call: Settle, since: Instant) -> bool {
        let res = match &call {
            Settle::Ack(tokens) => self.queue.ack(tokens).await,
            Settle::Later {
                token,
                not_before,
                counted: true,
                ..
            } => self.queue.retry_later(*token, *not_before).await,
            Settle::Later {
                token,
                not_before,
                counted: false,
                ..
            } => self.queue.release(*token, *not_before).await,
            Settle::Dead { token, reason } => self.queue.dead_letter(*token, reason).await,
        };
        match (res, call) {
            (Ok(()), Settle::Ack(tokens)) => {
                let n = tokens.len() as u64;
                metrics::counter!("postbox_replayed_total", "queue" => self.name.clone())
                    .increment(n);
                self.stats.replayed.fetch_add(n, Ordering::Relaxed);
            }
            (
                Ok(()),
                Settle::Later {
                    held_back: true, ..
                },
            ) => {
                self.stats.held_back.fetch_add(1, Ordering::Relaxed);
            }
            (Ok(()), Settle::Later { .. }) => {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            (Ok(()), Settle::Dead { token, reason }) => {
                tracing::warn!(queue = %self.name, id = %token.id, reason, "message dead-lettered");
                metrics::counter!("postbox_dead_lettered_total", "queue" => self.name.clone())
                    .increment(1);
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            (Err(e @ QueueError::Unavailable(_)), call) => {
                log_queue_error(call.what(), &e);
                if self.current(since) {
                    self.unsettled.push((since, call));
                    let at = later(Instant::now(), self.resettle_every());
                    self.resettle_at.get_or_insert(at);
                }
                return false;
            }
            (Err(e @ QueueError::LeaseLost(_)), Settle::Ack(tokens)) => {
                // Every current token of the batch was acked (`Queue::ack`); the error
                // names the first stale one. Counted as the only one: a stale token's
                // message is replayed (and counted) again, or was already.
                log_queue_error("ack", &e);
                let n = tokens.len().saturating_sub(1) as u64;
                metrics::counter!("postbox_replayed_total", "queue" => self.name.clone())
                    .increment(n);
                self.stats.replayed.fetch_add(n, Ordering::Relaxed);
            }
            // Acks: the leases expire and the messages are replayed again; the
            // idempotency key keeps the effect single.
            (Err(e), call) => log_queue_error(call.what(), &e),
        }
        true
    }

    /// How soon a queue call that found the queue unavailable is tried again:
    /// `poll_interval`, at most a twentieth of `lease_for`: within the margin a replay
    /// leaves before its lease ends (a tenth of it, and the ack interval). With a
    /// `poll_interval` as long as the lease, the call was dropped before its first
    /// retry, and an ack that met a blip replayed its message.
    fn resettle_every(&self) -> Duration {
        self.config.poll_interval.min(self.config.lease_for / 20)
    }

    /// Whether a settling call first tried at `since` may still find its lease
    /// current (`lease_for` has not passed since).
    fn current(&self, since: Instant) -> bool {
        since
            .checked_add(self.config.lease_for)
            .is_none_or(|end| Instant::now() < end)
    }

    /// Tries the calls the queue could not take again, oldest first, until the queue is
    /// still unavailable. A call whose lease can no longer be current is dropped
    /// unsent (its message is leased again); while calls wait, the next round is set.
    async fn resettle(&mut self) {
        self.resettle_at = None;
        let mut calls = std::mem::take(&mut self.unsettled).into_iter();
        for (since, call) in calls.by_ref() {
            if !self.current(since) {
                tracing::debug!(
                    op = call.what(),
                    "queue call dropped: its lease has run out"
                );
                continue;
            }
            if !self.try_settle(call, since).await {
                break;
            }
        }
        // Not tried this round: after the one that failed again.
        self.unsettled.extend(calls);
        if !self.unsettled.is_empty() {
            let at = later(Instant::now(), self.resettle_every());
            self.resettle_at.get_or_insert(at);
        }
    }

    async fn maybe_flush(&mut self) {
        if self.acks.is_empty() {
            return;
        }
        let now = Instant::now();
        if self.acks.len() >= self.config.ack_batch || self.ack_due.is_some_and(|d| d <= now) {
            self.flush().await;
        } else if self.ack_due.is_none() {
            self.ack_due = Some(later(now, self.config.ack_interval));
        }
    }

    async fn flush(&mut self) {
        self.ack_due = None;
        if self.acks.is_empty() {
            return;
        }
        let acks = std::mem::take(&mut self.acks);
        // Replays that finished together may exceed a batch: never send more than one.
        let now = Instant::now();
        if acks.len() <= self.config.ack_batch {
            self.try_settle(Settle::Ack(acks), now).await;
            return;
        }
        for batch in acks.chunks(self.config.ack_batch) {
            self.try_settle(Settle::Ack(batch.to_vec()), now).await;
        }
    }

    /// Sets the depth gauge, at most once per poll interval.
    async fn report_depth(&mut self) {
        let now = Instant::now();
        if self
            .depth_at
            .is_some_and(|at| now < later(at, self.config.poll_interval))
        {
            return;
        }
        self.depth_at = Some(now);
        self.report_depth_now().await;
    }

    async fn report_depth_now(&mut self) {
        if let Ok(depth) = self.queue.depth().await {
            let queue = &self.name;
            metrics::gauge!("postbox_queue_depth", "queue" => queue.clone(), "state" => "pending")
                .set(depth.pending as f64);
            metrics::gauge!("postbox_queue_depth", "queue" => queue.clone(), "state" => "in_flight")
                .set(depth.in_flight as f64);
            metrics::gauge!("postbox_queue_depth", "queue" => queue.clone(), "state" => "dead")
                .set(depth.dead as f64);
        }
    }
}

/// A panic's message (`panic!`'s text), or nothing.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

fn log_queue_error(op: &str, e: &QueueError) {
    match e {
        QueueError::LeaseLost(t) => tracing::debug!(id = %t.id, op, "lease lost"),
        e => tracing::warn!(error = %e, op, "replayer queue operation failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `409` with `Retry-After` is retried (the idempotency layer's "request in
    /// progress"), unless the classifier was told what a `409` is; one without it is a
    /// permanent rejection.
    #[cfg(feature = "http")]
    #[test]
    fn a_conflict_with_retry_after_is_retried_unless_classified() {
        use crate::classify::{Classification, HttpClassifier};
        let res = |after: Option<&str>| {
            let mut b = http::Response::builder().status(409);
            if let Some(a) = after {
                b = b.header(http::header::RETRY_AFTER, a);
            }
            b.body(()).unwrap()
        };
        let judge = HttpJudge::new();
        let with = res(Some("2"));
        assert!(matches!(
            judge.judge(Ok(&with)),
            Verdict::Retry { after: Some(d), .. } if d == Duration::from_secs(2)
        ));
        assert!(matches!(
            judge.judge(Ok(&res(None))),
            Verdict::Permanent { .. }
        ));
        let told = HttpJudge::with_classifier(
            HttpClassifier::new()
                .with_status(http::StatusCode::CONFLICT, Classification::success()),
        );
        // As any other `4xx` the classifier does not retry: not re-sent.
        assert!(matches!(told.judge(Ok(&with)), Verdict::Permanent { .. }));
    }

    /// A deadline that passed while the answer's body was read is retried, as one that
    /// passed during the call is: the replay's next attempt has a budget of its own.
    /// (The classifiers call it "not retryable", so it was dead-lettered.)
    #[cfg(feature = "http")]
    #[test]
    fn a_body_deadline_is_retried_not_dead_lettered() {
        let err = BoxError::from(BodyDeadlineExceeded::new());
        let judge = HttpJudge::new();
        assert!(matches!(
            judge.judge(Err::<&http::Response<()>, _>(&err)),
            Verdict::Retry { .. }
        ));
    }

    /// A due message to `http://api.test/orders`.
    #[cfg(feature = "http")]
    fn due_order() -> crate::queue::Envelope {
        let mut e = crate::queue::Envelope::new(
            "api.test:80",
            "POST",
            "http://api.test/orders",
            bytes::Bytes::new(),
            crate::queue::DeferReason::CircuitOpen,
        );
        e.not_before = wall_now();
        e
    }

    /// A replay that hangs until it is dropped (cut off), counted in `running` while
    /// it runs; `most` keeps the most that ran at once.
    #[cfg(feature = "http")]
    async fn hang_counted(
        running: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Result<http::Response<()>, BoxError> {
        struct Leave(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Leave {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(now, Ordering::SeqCst);
        let _leave = Leave(running);
        std::future::pending().await
    }

    /// A wall clock that jumps past a running replay's lease (a suspended VM resumed:
    /// its monotonic clock stood still, so the replay's cut-off did not fire) cuts that
    /// replay off before the next lease, which would lease its message again: never two
    /// replays of one message at once.
    #[cfg(feature = "http")]
    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_jump_never_runs_two_replays_of_one_message_at_once() {
        use crate::queue::{MemoryQueue, Queue};
        use std::sync::atomic::AtomicUsize;
        let queue = Arc::new(MemoryQueue::new());
        let mut e = due_order();
        e.idempotency_key = "k".into();
        // Answered at once, its ack waiting for a batch when the clock jumps.
        let mut done = e.clone();
        done.id = crate::queue::MessageId::new_v7();
        done.idempotency_key = "done".into();
        done.uri = "http://api.test/done".into();
        queue.enqueue(e).await.unwrap();
        queue.enqueue(done).await.unwrap();
        let (running, most, calls, done_calls) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let svc = tower::service_fn({
            let (running, most, calls, done_calls) = (
                running.clone(),
                most.clone(),
                calls.clone(),
                done_calls.clone(),
            );
            move |req: http::Request<
                super::super::BufferedBody<http_body_util::Full<bytes::Bytes>>,
            >| {
                let (running, most) = (running.clone(), most.clone());
                let answers = req.uri().path() == "/done";
                if answers {
                    done_calls.fetch_add(1, Ordering::SeqCst);
                } else {
                    calls.fetch_add(1, Ordering::SeqCst);
                }
                async move {
                    if answers {
                        return Ok(http::Response::new(()));
                    }
                    hang_counted(running, most).await
                }
            }
        });
        let handle = Replayer::http(queue.clone(), svc)
            .lease_for(Duration::from_secs(60))
            .ack_batch(100, Duration::from_secs(30))
            .spawn()
            .unwrap();
        // Bounded (in virtual time): a regression fails instead of spinning for ever.
        let start = tokio::time::Instant::now();
        while calls.load(Ordering::SeqCst) == 0 || done_calls.load(Ordering::SeqCst) == 0 {
            assert!(start.elapsed() < Duration::from_secs(60), "no replay ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        crate::enqueue::clock::jump_wall_clock(Duration::from_secs(120));
        while calls.load(Ordering::SeqCst) < 2 {
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "the message was never replayed again after the jump"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "two replays of one message at once"
        );
        assert_eq!(
            done_calls.load(Ordering::SeqCst),
            1,
            "a delivered message whose ack waited was replayed again"
        );
        handle.shutdown().await;
    }

    /// A worker at its concurrency cuts off a replay whose lease a wall-clock jump
    /// ended, too: the cut-off ran only before a lease, which a full worker does not
    /// ask for, so the replay ran on to its monotonic cut-off (54 s here) while
    /// another worker could lease the message again beside it.
    #[cfg(feature = "http")]
    #[tokio::test(start_paused = true)]
    async fn a_full_worker_cuts_off_a_replay_whose_lease_a_wall_clock_jump_ended() {
        use crate::queue::{MemoryQueue, Queue};
        use std::sync::atomic::AtomicUsize;
        let queue = Arc::new(MemoryQueue::new());
        queue.enqueue(due_order()).await.unwrap();
        let (running, calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let svc = tower::service_fn({
            let (running, calls) = (running.clone(), calls.clone());
            move |_: http::Request<
                super::super::BufferedBody<http_body_util::Full<bytes::Bytes>>,
            >| {
                calls.fetch_add(1, Ordering::SeqCst);
                hang_counted(running.clone(), Arc::default())
            }
        });
        let handle = Replayer::http(queue.clone(), svc)
            .concurrency(1)
            .lease_for(Duration::from_secs(60))
            .poll_interval(Duration::from_millis(100))
            .spawn()
            .unwrap();
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        crate::enqueue::clock::jump_wall_clock(Duration::from_secs(120));
        let jumped = Instant::now();
        while calls.load(Ordering::SeqCst) < 2 {
            assert!(
                jumped.elapsed() < Duration::from_secs(5),
                "the replay its lease's end cut off ran on"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(running.load(Ordering::SeqCst) <= 1);
        handle.shutdown().await;
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let c = ReplayConfig {
            jitter: false,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
            ..ReplayConfig::default()
        };
        let mut rng = fastrand::Rng::with_seed(1);
        let got: Vec<u64> = (1..=6).map(|a| c.backoff(a, &mut rng).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 10, 10]);
        assert_eq!(c.backoff(u32::MAX, &mut rng), Duration::from_secs(10));
    }

    #[test]
    fn jittered_backoff_stays_in_the_upper_half() {
        let c = ReplayConfig::default();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut jittered = 0;
        for a in 1..20 {
            let full = c
                .backoff_base
                .saturating_mul(1 << (a - 1).min(31))
                .min(c.backoff_max);
            let d = c.backoff(a, &mut rng);
            assert!(d >= full / 2 && d <= full, "{a}: {d:?}");
            jittered += usize::from(d < full);
        }
        assert!(
            jittered > 10,
            "jitter is on by default: {jittered} of 19 below the full delay"
        );
    }

    #[test]
    fn classifier_judge_verdicts() {
        let j = ClassifierJudge::new(ErrorClassifier::new());
        assert_eq!(j.judge(Ok::<_, &BoxError>(&())), Verdict::Delivered);
        let open: BoxError = Open::new(Duration::from_secs(5)).into();
        assert_eq!(
            Judge::<(), _>::judge(&j, Err(&open)),
            Verdict::CircuitOpen {
                retry_after: Duration::from_secs(5)
            }
        );
        let late: BoxError = DeadlineExceeded::new(Duration::from_secs(1), false).into();
        assert!(matches!(
            Judge::<(), _>::judge(&j, Err(&late)),
            Verdict::Retry { .. }
        ));
    }

    /// A gRPC `INTERNAL` or `UNKNOWN` is replayed again later (as an HTTP `500` is),
    /// not dead-lettered on the first attempt; one whose server said not to retry
    /// (a negative pushback), and `DATA_LOSS`, are dead-lettered.
    #[cfg(feature = "grpc")]
    #[test]
    fn a_grpc_internal_or_unknown_is_replayed_again() {
        let j = ClassifierJudge::new(ErrorClassifier::new());
        let judge = |status: tonic::Status| {
            let e: BoxError = status.into();
            Judge::<(), _>::judge(&j, Err(&e))
        };
        assert!(matches!(
            judge(tonic::Status::internal("bug")),
            Verdict::Retry { after: None, .. }
        ));
        assert!(matches!(
            judge(tonic::Status::unknown("reset")),
            Verdict::Retry { .. }
        ));
        let mut refused = tonic::Status::internal("do not");
        refused
            .metadata_mut()
            .insert("grpc-retry-pushback-ms", "-1".parse().unwrap());
        assert!(matches!(judge(refused), Verdict::Permanent { .. }));
        assert!(matches!(
            judge(tonic::Status::data_loss("gone")),
            Verdict::Permanent { .. }
        ));
        // The classifier decides first: one that reads `INTERNAL` as no failure is
        // obeyed (not retried).
        let done = ClassifierJudge::new(|_: Result<&(), &BoxError>| Classification::success());
        let e: BoxError = tonic::Status::internal("already processed").into();
        assert!(matches!(done.judge(Err(&e)), Verdict::Permanent { .. }));
    }

    /// A redirect is not followed, and a `307`/`308` means the request was not applied:
    /// dead-lettered with its `Location` (credentials redacted), not acked as delivered
    /// (the message was lost). `303 See Other` is the answer to an applied request.
    #[cfg(feature = "http")]
    #[test]
    fn a_redirect_is_permanent_not_delivered() {
        let j = HttpJudge::new();
        let res = |status: u16| {
            http::Response::builder()
                .status(status)
                .header("location", "http://elsewhere/orders")
                .body(())
                .unwrap()
        };
        for status in [301, 302, 307, 308] {
            let v = j.judge(Ok(&res(status)));
            assert!(
                matches!(&v, Verdict::Permanent { reason } if reason.contains("http://elsewhere/orders")),
                "{status}: {v:?}"
            );
        }
        assert_eq!(j.judge(Ok(&res(303))), Verdict::Delivered);
        assert_eq!(j.judge(Ok(&res(201))), Verdict::Delivered);
        // A signed `Location` is stored and logged without its signature.
        let signed = http::Response::builder()
            .status(307)
            .header("location", "https://bucket/o?X-Amz-Signature=sg-444&part=1")
            .body(())
            .unwrap();
        let v = j.judge(Ok(&signed));
        assert!(
            matches!(&v, Verdict::Permanent { reason }
                if !reason.contains("sg-444") && reason.contains("X-Amz-Signature=<redacted>&part=1")),
            "{v:?}"
        );
        // A userinfo longer than the reason keeps of a `Location` is redacted too.
        let long = format!("https://u:{}@host/o", "t".repeat(300));
        let v = j.judge(Ok(&http::Response::builder()
            .status(308)
            .header("location", long.as_str())
            .body(())
            .unwrap()));
        assert!(
            matches!(&v, Verdict::Permanent { reason } if !reason.contains("ttt")),
            "{v:?}"
        );
    }

    #[test]
    fn invalid_config_is_an_error() {
        let c = ReplayConfig {
            concurrency: 0,
            ..ReplayConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field(), "replay.concurrency");
    }

    /// An `ack_interval` over half the lease would leave a replay little of its lease to
    /// run (or none): refused. At half, a replay gets two fifths of the lease (a tenth
    /// and the ack interval are kept for settling).
    #[test]
    fn an_ack_interval_over_half_the_lease_is_an_error() {
        let c = |ms| ReplayConfig {
            lease_for: Duration::from_secs(1),
            ack_interval: Duration::from_millis(ms),
            ..ReplayConfig::default()
        };
        assert_eq!(
            c(501).validate().unwrap_err().field(),
            "replay.ack_interval"
        );
        assert!(c(500).validate().is_ok());
        assert_eq!(c(500).replay_limit(), Duration::from_millis(400));
        assert_eq!(c(10).replay_limit(), Duration::from_millis(890));
    }
}
