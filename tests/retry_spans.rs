//! Every retry attempt runs in its own `debug` span `retry_attempt`, the first one
//! included; a retry's readiness too.
//!
//! In a binary of their own: tracing caches each callsite's interest process-wide, and
//! a test on another thread with no subscriber would race these tests' thread-scoped
//! subscribers for that cache (each test here sets one).

use postbox::BoxError;
use postbox::retry::RetryLayer;
use postbox::retry::backoff::Backoff;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::{Layer, ServiceExt, service_fn};

#[tokio::test(start_paused = true)]
async fn every_attempt_runs_in_its_own_retry_attempt_span() {
    let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let inner = service_fn({
        let seen = seen.clone();
        move |x: u32| {
            let span = tracing::Span::current();
            let n = {
                let mut seen = seen.lock().unwrap();
                seen.push((span.metadata().map(|m| m.name()), span.id()));
                seen.len()
            };
            std::future::ready(if n < 3 {
                Err::<u32, BoxError>(io::Error::from(io::ErrorKind::ConnectionReset).into())
            } else {
                Ok(x)
            })
        }
    });
    let retry = three_retries();
    assert_eq!(retry.layer(inner).oneshot(7).await.unwrap(), 7);

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter().all(|(name, _)| *name == Some("retry_attempt")),
        "{seen:?}"
    );
    let ids: std::collections::HashSet<_> = seen.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids.len(), 3, "one span per attempt");
}

/// A retry's readiness runs in its attempt's span too: a breaker that goes half-open
/// or a bulkhead that rejects in `poll_ready` logs under the attempt it belongs to.
#[tokio::test(start_paused = true)]
async fn a_retrys_readiness_runs_in_its_attempts_span() {
    use std::task::{Context, Poll};

    #[derive(Clone)]
    struct Recording {
        ready_in: Arc<Mutex<Vec<Option<&'static str>>>>,
        calls: Arc<Mutex<u32>>,
    }
    impl tower::Service<u32> for Recording {
        type Response = u32;
        type Error = BoxError;
        type Future = std::future::Ready<Result<u32, BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            let name = tracing::Span::current().metadata().map(|m| m.name());
            self.ready_in.lock().unwrap().push(name);
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, x: u32) -> Self::Future {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            std::future::ready(if *calls < 3 {
                Err(io::Error::from(io::ErrorKind::ConnectionReset).into())
            } else {
                Ok(x)
            })
        }
    }

    let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
    let inner = Recording {
        ready_in: Arc::default(),
        calls: Arc::default(),
    };
    let retry = three_retries();
    assert_eq!(retry.layer(inner.clone()).oneshot(7).await.unwrap(), 7);
    let ready_in = inner.ready_in.lock().unwrap().clone();
    // The first attempt's readiness is the caller's `poll_ready`, before any attempt.
    assert_eq!(
        ready_in[1..],
        [Some("retry_attempt"), Some("retry_attempt")],
        "{ready_in:?}"
    );
}

/// Up to three retries, 10 ms apart, without a budget.
fn three_retries() -> RetryLayer<
    postbox::retry::RetryPolicy<postbox::classify::ErrorClassifier, postbox::retry::Cloned, ()>,
> {
    RetryLayer::builder()
        .max_retries(3)
        .backoff(Backoff::constant(Duration::from_millis(10)))
        .no_budget()
        .build()
        .unwrap()
}
