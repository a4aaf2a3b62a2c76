use super::config::CircuitBreakerBuilder;
use super::handle::CircuitBreakerHandle;
use super::service::CircuitBreaker;
use super::shared::Shared;
use super::state::Breaker;
use crate::classify::ErrorClassifier;
use std::sync::Arc;
use tower_layer::Layer;

/// Applies a [`CircuitBreaker`]; every service it makes (and every clone of them)
/// shares one breaker.
///
/// `C` classifies outcomes ([`ErrorClassifier`] by default; use
/// [`HttpClassifier`](crate::classify::HttpClassifier) for HTTP clients).
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C = ErrorClassifier> {
    breaker: Arc<Shared>,
    classifier: C,
}

// === impl CircuitBreakerLayer ===

impl CircuitBreakerLayer {
    /// A breaker with the [builder's defaults](CircuitBreakerBuilder).
    pub fn new() -> Self {
        // The defaults are valid (a unit test checks it): no validation needed.
        let settings = CircuitBreakerBuilder::default().settings();
        Self::from_breaker(Arc::new(Breaker::new(
            settings,
            tokio::time::Instant::now(),
            Box::new(()),
        )))
    }

    /// A builder, starting from the defaults.
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder::default()
    }

    pub(crate) fn from_breaker(breaker: Arc<Breaker>) -> Self {
        breaker.show_closed();
        Self {
            breaker: Arc::new(Shared::new(breaker)),
            classifier: ErrorClassifier::new(),
        }
    }
}

impl Default for CircuitBreakerLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// Classifies outcomes with `classifier` instead.
    pub fn with_classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            breaker: self.breaker,
            classifier,
        }
    }

    /// A handle to observe and control the shared breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle::new(self.breaker.breaker().clone())
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::new(inner, self.breaker.clone(), self.classifier.clone())
    }
}
