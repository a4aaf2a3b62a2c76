//! `serde` configuration of the retry layer.

use super::backoff::{Backoff, Jitter};
use super::budget::RetryBudget;
use super::layer::{DEFAULT_MAX_RETRIES, DEFAULT_MAX_RETRY_AFTER, RetryBuilder};
use crate::error::ConfigError;
use serde::Deserialize;
use std::time::Duration;

/// The retry layer's configuration, deserializable from TOML, YAML or JSON.
///
/// Every field is optional (the defaults of [`RetryLayer::new`](super::RetryLayer::new));
/// unknown fields are an error. Durations are strings: `"250ms"`, `"2s"`, `"1.5s"`,
/// `"1m"`.
///
/// ```
/// use postbox::retry::{RetryConfig, RetryLayer};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config: RetryConfig = serde_json::from_str(r#"{
///     "max_retries": 2,
///     "backoff": { "kind": "exponential", "base": "50ms", "max_delay": "2s", "jitter": "equal" },
///     "max_retry_after": "30s",
///     "budget": { "ratio": 0.1, "min_retries_per_sec": 5, "ttl": "10s" }
/// }"#)?;
/// let layer = config.apply(RetryLayer::builder())?.build()?;
/// assert_eq!(layer.policy().max_retries(), 2);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Retries after the first attempt (3: up to 4 attempts in all).
    pub max_retries: u32,
    /// The backoff between attempts.
    pub backoff: BackoffConfig,
    /// The longest server hint honoured; a longer one ends the retries.
    #[serde(deserialize_with = "crate::duration::required")]
    pub max_retry_after: Duration,
    /// The longest wait for an open circuit breaker inside to admit calls again; a
    /// longer break ends the retries with the rejection at once (see
    /// [`RetryBuilder::max_open_wait`]). Unset: `max_retry_after`, except in the stack
    /// of `ClientConfig::deferring_layer`, where it is zero: the enqueue fallback
    /// defers a request at once instead of holding its caller for the break (and a
    /// request it keeps synchronous gets the rejection at once).
    #[serde(deserialize_with = "crate::duration::option")]
    pub max_open_wait: Option<Duration>,
    /// The retry budget.
    pub budget: BudgetConfig,
    /// HTTP only (`RetryConfig::http_requests`): add a generated
    /// `Idempotency-Key` to requests that are not retry-safe (default `false`); a
    /// caller's key that is not ASCII is kept, and its request not retried.
    pub generate_idempotency_key: bool,
    /// HTTP only (`RetryConfig::http_requests`): treat every method as
    /// retry-safe, `POST` and `PATCH` included (default `false`; for services known to
    /// de-duplicate).
    pub retry_unsafe_methods: bool,
    /// HTTP only (`RetryConfig::http_requests`): the gRPC methods safe to repeat,
    /// `/package.Service/Method` or `/package.Service/*` for a whole service (see
    /// [`HttpRequests::idempotent_grpc_method`](super::HttpRequests::idempotent_grpc_method);
    /// default none: a gRPC call is a `POST`, retried only after failures that had no
    /// effect, unless it carries an `Idempotency-Key`).
    pub idempotent_grpc_methods: Vec<String>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: DEFAULT_MAX_RETRIES,
            backoff: BackoffConfig::default(),
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            max_open_wait: None,
            budget: BudgetConfig::default(),
            generate_idempotency_key: false,
            retry_unsafe_methods: false,
            idempotent_grpc_methods: Vec::new(),
        }
    }
}

/// How the backoff grows, before [`jitter`](BackoffConfig::jitter) (full by default,
/// whatever the kind: `jitter = "none"` for the delays below exactly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BackoffKind {
    /// `base` every time.
    Constant,
    /// `base × n`.
    Linear,
    /// `base × factor^(n−1)`.
    Exponential,
}

/// The backoff section of [`RetryConfig`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// Growth (default exponential).
    pub kind: BackoffKind,
    /// Delay before the first retry (default 100 ms).
    #[serde(deserialize_with = "crate::duration::required")]
    pub base: Duration,
    /// Growth factor for exponential backoff (default 2; another value with another
    /// `kind` is an error, not ignored).
    pub factor: f64,
    /// Cap on the computed delay (default 10 s).
    #[serde(deserialize_with = "crate::duration::required")]
    pub max_delay: Duration,
    /// Jitter (default full). `decorrelated` grows by its own rule, so it is an error
    /// with a `kind` other than exponential or a `factor` other than 2.
    pub jitter: Jitter,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        let b = Backoff::default();
        Self {
            kind: BackoffKind::Exponential,
            base: b.base(),
            factor: 2.0,
            max_delay: b.max_delay(),
            jitter: b.jitter(),
        }
    }
}

impl BackoffConfig {
    /// The backoff this describes.
    ///
    /// # Errors
    /// See [`Backoff::validate`].
    pub fn to_backoff(&self) -> Result<Backoff, ConfigError> {
        // Set for another growth, a factor would be ignored without a word (the default
        // 2 is left alone: a preset's exponential backoff may be switched to linear).
        #[expect(clippy::float_cmp, reason = "the default, exactly")]
        if self.kind != BackoffKind::Exponential && self.factor != 2.0 {
            return Err(ConfigError::new(
                "retry.backoff.factor",
                "applies to exponential backoff only (kind = \"exponential\")",
            ));
        }
        // Decorrelated jitter grows by its own rule (up to three times the previous
        // delay): another growth given with it would be ignored as well.
        #[expect(clippy::float_cmp, reason = "the default, exactly")]
        if self.jitter == Jitter::Decorrelated
            && (self.kind != BackoffKind::Exponential || self.factor != 2.0)
        {
            return Err(ConfigError::new(
                "retry.backoff.jitter",
                "\"decorrelated\" grows by its own rule (up to three times the previous \
                 delay): it takes no kind or factor",
            ));
        }
        let b = match self.kind {
            BackoffKind::Constant => Backoff::constant(self.base),
            BackoffKind::Linear => Backoff::linear(self.base),
            BackoffKind::Exponential => Backoff::exponential(self.base).with_factor(self.factor),
        }
        .with_max_delay(self.max_delay)
        .with_jitter(self.jitter);
        b.validate()?;
        Ok(b)
    }
}

/// The budget section of [`RetryConfig`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// `false` disables the budget (default `true`).
    pub enabled: bool,
    /// Share of first attempts that may be retried (default 0.2).
    pub ratio: f64,
    /// Retries always allowed per second (default 10): `n × ttl` per window, usable
    /// in a burst.
    pub min_retries_per_sec: u32,
    /// Window (default 10 s).
    #[serde(deserialize_with = "crate::duration::required")]
    pub ttl: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ratio: 0.2,
            min_retries_per_sec: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

impl BudgetConfig {
    /// The budget this describes, or `None` when disabled.
    ///
    /// # Errors
    /// See [`RetryBudgetBuilder::build`](super::budget::RetryBudgetBuilder::build).
    /// A budget that earns nothing and keeps no reserve (`ratio` and
    /// `min_retries_per_sec` both 0) is an error here: it allows no retry at all, which a
    /// file says plainly with `max_retries = 0`. (The builder in code takes it, as a
    /// spent budget.)
    pub fn to_budget(&self) -> Result<Option<RetryBudget>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        if self.ratio == 0.0 && self.min_retries_per_sec == 0 {
            return Err(ConfigError::new(
                "retry.budget",
                "with ratio 0 and min_retries_per_sec 0 no request is ever retried: set \
                 max_retries = 0 to turn retries off, or enabled = false to retry without \
                 a budget",
            ));
        }
        RetryBudget::builder()
            .ratio(self.ratio)
            .min_retries_per_sec(self.min_retries_per_sec)
            .ttl(self.ttl)
            .build()
            .map(Some)
    }
}

impl RetryConfig {
    /// Applies this configuration to `builder` (its classifier, request strategy and
    /// hook are kept).
    ///
    /// # Errors
    /// An invalid backoff or budget.
    pub fn apply<C, R, H>(
        &self,
        builder: RetryBuilder<C, R, H>,
    ) -> Result<RetryBuilder<C, R, H>, ConfigError> {
        let mut builder = builder
            .max_retries(self.max_retries)
            .backoff(self.backoff.to_backoff()?)
            .max_retry_after(self.max_retry_after);
        if let Some(max) = self.max_open_wait {
            builder = builder.max_open_wait(max);
        }
        Ok(match self.budget.to_budget()? {
            Some(b) => builder.budget(b),
            None => builder.no_budget(),
        })
    }
}

#[cfg(feature = "http")]
impl RetryConfig {
    /// The HTTP request strategy this describes (`generate_idempotency_key`,
    /// `retry_unsafe_methods`, `idempotent_grpc_methods`; a pattern that names no
    /// method as meant is logged, and refused by [`build_http`](Self::build_http)).
    pub fn http_requests(&self) -> super::HttpRequests {
        let mut requests =
            super::HttpRequests::new().generate_idempotency_key(self.generate_idempotency_key);
        if self.retry_unsafe_methods {
            requests = requests.retry_every_method();
        }
        self.idempotent_grpc_methods
            .iter()
            .fold(requests, |r, m| r.idempotent_grpc_method(m.clone()))
    }

    /// Each of `idempotent_grpc_methods` names a method as meant: an error names the
    /// entry (`retry.idempotent_grpc_methods[1]`).
    pub(crate) fn check_grpc_methods(&self) -> Result<(), ConfigError> {
        for (i, m) in self.idempotent_grpc_methods.iter().enumerate() {
            crate::http::check_method_pattern(format!("retry.idempotent_grpc_methods[{i}]"), m)?;
        }
        Ok(())
    }

    /// An HTTP retry layer from this configuration: [`RetryLayer::http`](super::RetryLayer::http)
    /// with these values applied.
    ///
    /// # Errors
    /// An invalid backoff or budget, or an `idempotent_grpc_methods` entry that names no
    /// method as meant.
    pub fn build_http(
        &self,
    ) -> Result<
        super::RetryLayer<
            super::RetryPolicy<crate::classify::HttpClassifier, super::HttpRequests, ()>,
        >,
        ConfigError,
    > {
        self.check_grpc_methods()?;
        self.apply(super::RetryLayer::http().requests(self.http_requests()))?
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decorrelated jitter grows by its own rule: a kind or factor given with it is an
    /// error naming the jitter, not ignored (a constant 1 s backoff grew to the cap).
    #[test]
    fn a_growth_given_with_decorrelated_jitter_is_an_error() {
        for (kind, factor) in [
            (BackoffKind::Constant, 2.0),
            (BackoffKind::Linear, 2.0),
            (BackoffKind::Exponential, 5.0),
        ] {
            let set = BackoffConfig {
                kind,
                factor,
                jitter: Jitter::Decorrelated,
                ..BackoffConfig::default()
            };
            let e = set.to_backoff().unwrap_err();
            assert_eq!(e.field(), "retry.backoff.jitter", "{kind:?} {factor}");
        }
        let plain = BackoffConfig {
            jitter: Jitter::Decorrelated,
            ..BackoffConfig::default()
        };
        assert!(plain.to_backoff().is_ok());
    }

    /// A factor set for a linear or constant backoff is an error naming it, not
    /// ignored; the default factor, left from a preset, is not.
    #[test]
    fn a_factor_set_for_a_linear_or_constant_backoff_is_an_error() {
        for kind in [BackoffKind::Linear, BackoffKind::Constant] {
            let set = BackoffConfig {
                kind,
                factor: 3.0,
                ..BackoffConfig::default()
            };
            let e = set.to_backoff().unwrap_err();
            assert_eq!(e.field(), "retry.backoff.factor", "{kind:?}");
            let default = BackoffConfig {
                kind,
                ..BackoffConfig::default()
            };
            assert!(default.to_backoff().is_ok(), "{kind:?}");
        }
        let exponential = BackoffConfig {
            factor: 3.0,
            ..BackoffConfig::default()
        };
        assert!(exponential.to_backoff().is_ok());
    }

    #[cfg(feature = "http")]
    #[test]
    fn http_options_build_an_http_layer() {
        let c: RetryConfig = serde_json::from_str(
            r#"{"max_retries": 1, "generate_idempotency_key": true, "budget": {"enabled": false}}"#,
        )
        .unwrap();
        let layer = c.build_http().unwrap();
        assert_eq!(layer.policy().max_retries(), 1);
        assert!(layer.policy().budget().is_none());
        let mut req = http::Request::post("http://a/").body(()).unwrap();
        super::super::CloneRequest::prepare(layer.policy().requests(), &mut req);
        assert!(req.headers().contains_key("idempotency-key"));
    }

    /// `retry_unsafe_methods` with `generate_idempotency_key`: every method is retried,
    /// and a `POST` still carries a key for the service to de-duplicate on (the rule
    /// that retries everything switched the keys off). A custom rule naming a method
    /// safe keeps its requests keyless.
    #[cfg(feature = "http")]
    #[test]
    fn retrying_every_method_still_sends_a_post_with_a_key() {
        use super::super::CloneRequest;
        let c: RetryConfig = serde_json::from_str(
            r#"{"generate_idempotency_key": true, "retry_unsafe_methods": true}"#,
        )
        .unwrap();
        let requests = c.http_requests();
        let mut post = http::Request::post("http://a/").body(()).unwrap();
        requests.prepare(&mut post);
        assert!(post.headers().contains_key("idempotency-key"));
        let mut get = http::Request::get("http://a/").body(()).unwrap();
        requests.prepare(&mut get);
        assert!(!get.headers().contains_key("idempotency-key"));

        let named = super::super::HttpRequests::new()
            .generate_idempotency_key(true)
            .retry_safe_if(|m, _| m == http::Method::POST);
        let mut post = http::Request::post("http://a/").body(()).unwrap();
        named.prepare(&mut post);
        assert!(!post.headers().contains_key("idempotency-key"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<RetryConfig>(r#"{"max_retry": 2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn empty_config_is_the_default() {
        let c: RetryConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, RetryConfig::default());
    }

    #[test]
    fn invalid_values_are_config_errors_not_panics() {
        let c: RetryConfig = serde_json::from_str(r#"{"backoff": {"factor": 0.0}}"#).unwrap();
        let e = c.apply(super::super::RetryLayer::builder()).unwrap_err();
        assert_eq!(e.field(), "retry.backoff.factor");
        let c: RetryConfig = serde_json::from_str(r#"{"budget": {"ratio": -1.0}}"#).unwrap();
        assert!(c.apply(super::super::RetryLayer::builder()).is_err());
    }

    #[test]
    fn a_budget_that_allows_no_retry_is_a_config_error() {
        let c: RetryConfig =
            serde_json::from_str(r#"{"budget": {"ratio": 0.0, "min_retries_per_sec": 0}}"#)
                .unwrap();
        let e = c.apply(super::super::RetryLayer::builder()).unwrap_err();
        assert_eq!(e.field(), "retry.budget");
        // Either alone still allows retries.
        for budget in [
            r#"{"budget": {"ratio": 0.0, "min_retries_per_sec": 1}}"#,
            r#"{"budget": {"ratio": 0.1, "min_retries_per_sec": 0}}"#,
            r#"{"budget": {"enabled": false, "ratio": 0.0, "min_retries_per_sec": 0}}"#,
        ] {
            let c: RetryConfig = serde_json::from_str(budget).unwrap();
            assert!(
                c.apply(super::super::RetryLayer::builder()).is_ok(),
                "{budget}"
            );
        }
    }
}
