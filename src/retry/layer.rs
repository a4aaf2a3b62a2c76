use super::backoff::{Backoff, JitterRng};
use super::budget::RetryBudget;
use super::policy::{Cloned, RetryPolicy};
use super::service::Retry;
use crate::classify::ErrorClassifier;
use crate::error::ConfigError;
use std::time::Duration;
use tower_layer::Layer;

/// The default cap on a server hint: a longer `Retry-After` ends the retries.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The default number of retries: 3, so up to 4 attempts in all.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// Applies [`Retry`]; every service it makes (and every clone) shares one budget.
///
/// `P` is the [`RetryPolicy`] built by [`RetryBuilder`].
#[derive(Debug, Clone)]
pub struct RetryLayer<P> {
    policy: P,
}

/// The policy of [`RetryLayer::new`]: any `Clone` request, errors classified by kind.
pub type DefaultPolicy = RetryPolicy<ErrorClassifier, Cloned, ()>;

// === impl RetryLayer ===

impl RetryLayer<DefaultPolicy> {
    /// The defaults for any `Clone` request: [`ErrorClassifier`], 3 retries (4 attempts
    /// in all), [`Backoff::default`], the default [`RetryBudget`] (fresh for this
    /// layer), hints honoured up to [`DEFAULT_MAX_RETRY_AFTER`].
    ///
    /// Every request counts as retry-safe ([`Cloned`](super::Cloned), tower's `Retry`
    /// semantics): an `http::Request` with a `Clone` body is a `Clone` request, so a
    /// `POST` would be sent again after a failure that may have taken effect. For HTTP
    /// start from [`RetryLayer::http`], which retries only idempotent methods or
    /// requests with an `Idempotency-Key` then (and replays bodies that are not
    /// `Clone`); changing only the [`classifier`](RetryBuilder::classifier) of this
    /// builder keeps `Cloned`.
    pub fn new() -> Self {
        Self::builder().build().expect("the defaults are valid")
    }

    /// A builder starting from the defaults of [`new`](Self::new) (every request
    /// retry-safe: for HTTP see [`RetryLayer::http`]).
    pub fn builder() -> RetryBuilder<ErrorClassifier, Cloned, ()> {
        RetryBuilder {
            classifier: ErrorClassifier::new(),
            requests: Cloned::new(),
            on_retry: (),
            max_retries: DEFAULT_MAX_RETRIES,
            backoff: Backoff::default(),
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            max_open_wait: None,
            budget: BudgetChoice::Default,
            rng: JitterRng::thread(),
        }
    }
}

impl Default for RetryLayer<DefaultPolicy> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "http")]
impl RetryLayer<RetryPolicy<crate::classify::HttpClassifier, super::policy::HttpRequests, ()>> {
    /// A builder for HTTP clients: [`HttpClassifier`](crate::classify::HttpClassifier)
    /// (`Retry-After` honoured) and [`HttpRequests`](super::HttpRequests) (only
    /// idempotent methods or requests with an `Idempotency-Key` are retried after an
    /// attempt that may have taken effect); otherwise the defaults of
    /// [`new`](RetryLayer::new).
    pub fn http() -> RetryBuilder<crate::classify::HttpClassifier, super::policy::HttpRequests, ()>
    {
        RetryLayer::builder()
            .classifier(crate::classify::HttpClassifier::new())
            .requests(super::policy::HttpRequests::new())
    }
}

impl<P> RetryLayer<P> {
    /// A layer applying `policy`.
    pub const fn from_policy(policy: P) -> Self {
        Self { policy }
    }

    /// The policy.
    pub const fn policy(&self) -> &P {
        &self.policy
    }
}

impl<S, C: Clone, R: Clone, H: Clone> Layer<S> for RetryLayer<RetryPolicy<C, R, H>> {
    type Service = Retry<S, RetryPolicy<C, R, H>>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(inner, self.policy.clone())
    }
}

#[derive(Debug, Clone)]
enum BudgetChoice {
    Default,
    None,
    Shared(RetryBudget),
}

/// Builds a [`RetryLayer`], validating the configuration.
///
/// `C` classifies outcomes, `R` copies requests and says which are retry-safe, `H` is
/// the hook called before every retry.
#[derive(Debug, Clone)]
pub struct RetryBuilder<C, R, H> {
    classifier: C,
    requests: R,
    on_retry: H,
    max_retries: u32,
    backoff: Backoff,
    max_retry_after: Duration,
    max_open_wait: Option<Duration>,
    budget: BudgetChoice,
    rng: JitterRng,
}

// === impl RetryBuilder ===

impl<C, R, H> RetryBuilder<C, R, H> {
    /// Retries after the first attempt: `max_retries(3)` means **up to 4 attempts in
    /// all**; 0 disables retries. `u32::MAX` means no limit (as Polly's
    /// `int.MaxValue`): only the budget, the deadline or the outcome ends the retries.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// The backoff between attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The longest server hint (`Retry-After`, `grpc-retry-pushback-ms`) to wait for. A
    /// hint above it ends the retries at once and returns the last outcome. An open
    /// breaker's `retry_after` is bounded by [`max_open_wait`](Self::max_open_wait)
    /// instead (by default this same value). Default: [`DEFAULT_MAX_RETRY_AFTER`].
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// The longest wait for an open circuit breaker inside to admit calls again (its
    /// [`Open::retry_after`](crate::circuit_breaker::error::Open::retry_after): the hint
    /// of an outcome that
    /// [`is_own_rejection`](crate::classify::Classification::is_own_rejection); a
    /// breaker forced open is never waited for). A longer
    /// break ends the retries at once with the rejection: the caller fails fast, or an
    /// [enqueue fallback](crate::enqueue) outside defers the request at once, instead of
    /// waiting out the break. Default: [`max_retry_after`](Self::max_retry_after);
    /// `Duration::ZERO` never waits for a break (a half-open breaker's rejection, whose
    /// hint is zero, is still retried after the backoff).
    pub fn max_open_wait(mut self, max: Duration) -> Self {
        self.max_open_wait = Some(max);
        self
    }

    /// Uses `budget` (shared with every layer given a clone of it).
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = BudgetChoice::Shared(budget);
        self
    }

    /// No budget: only `max_retries` bounds the retries.
    pub fn no_budget(mut self) -> Self {
        self.budget = BudgetChoice::None;
        self
    }

    /// The source of jitter (seed it in tests).
    pub fn rng(mut self, rng: JitterRng) -> Self {
        self.rng = rng;
        self
    }

    /// Classifies outcomes with `classifier`.
    pub fn classifier<C2>(self, classifier: C2) -> RetryBuilder<C2, R, H> {
        RetryBuilder {
            classifier,
            requests: self.requests,
            on_retry: self.on_retry,
            max_retries: self.max_retries,
            backoff: self.backoff,
            max_retry_after: self.max_retry_after,
            max_open_wait: self.max_open_wait,
            budget: self.budget,
            rng: self.rng,
        }
    }

    /// Copies requests and judges their retry safety with `requests`.
    pub fn requests<R2>(self, requests: R2) -> RetryBuilder<C, R2, H> {
        RetryBuilder {
            classifier: self.classifier,
            requests,
            on_retry: self.on_retry,
            max_retries: self.max_retries,
            backoff: self.backoff,
            max_retry_after: self.max_retry_after,
            max_open_wait: self.max_open_wait,
            budget: self.budget,
            rng: self.rng,
        }
    }

    /// Calls `hook` before every retry (see [`OnRetry`](super::OnRetry)).
    pub fn on_retry<H2>(self, hook: H2) -> RetryBuilder<C, R, H2> {
        RetryBuilder {
            classifier: self.classifier,
            requests: self.requests,
            on_retry: hook,
            max_retries: self.max_retries,
            backoff: self.backoff,
            max_retry_after: self.max_retry_after,
            max_open_wait: self.max_open_wait,
            budget: self.budget,
            rng: self.rng,
        }
    }

    /// Validates and builds the layer (a default budget is created here, once).
    ///
    /// # Errors
    /// An invalid backoff (see [`Backoff::validate`]), or a `max_retry_after` or
    /// `max_open_wait` above one day ([`MAX_BACKOFF`](super::backoff::MAX_BACKOFF)): a caller held that long by a server's
    /// hint is a hung call (a deadline bounds it too; without one nothing would).
    pub fn build(self) -> Result<RetryLayer<RetryPolicy<C, R, H>>, ConfigError> {
        self.backoff.validate()?;
        if self.max_retry_after > super::backoff::MAX_BACKOFF {
            return Err(ConfigError::new(
                "retry.max_retry_after",
                "must be at most one day",
            ));
        }
        if self
            .max_open_wait
            .is_some_and(|max| max > super::backoff::MAX_BACKOFF)
        {
            return Err(ConfigError::new(
                "retry.max_open_wait",
                "must be at most one day",
            ));
        }
        let budget = match self.budget {
            BudgetChoice::Default => Some(RetryBudget::new()),
            BudgetChoice::None => None,
            BudgetChoice::Shared(b) => Some(b),
        };
        Ok(RetryLayer {
            policy: RetryPolicy {
                classifier: self.classifier,
                requests: self.requests,
                on_retry: self.on_retry,
                max_retries: self.max_retries,
                backoff: self.backoff,
                max_retry_after: self.max_retry_after,
                max_open_wait: self.max_open_wait.unwrap_or(self.max_retry_after),
                budget,
                rng: self.rng,
            },
        })
    }
}
