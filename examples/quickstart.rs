//! A flaky dependency behind a postbox client stack, on the embedded machinery only
//! (no broker, no network): the bulkhead sheds at once the calls beyond its 4 permits,
//! and the attempt timeout cuts a hung attempt at 100 ms (the 500 ms deadline bounds
//! the whole call; with no retry inside, the attempt timeout ends first).
//!
//! `cargo run --example quickstart`

use postbox::BoxError;
use postbox::bulkhead::BulkheadLayer;
use postbox::classify::{Classify, ErrorClassifier};
use postbox::error::find_cause;
use postbox::timeout::{AttemptTimeoutLayer, DeadlineLayer};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tower::{ServiceBuilder, ServiceExt, service_fn};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    // Every third call that reaches it hangs for a second; the others answer in 5 ms.
    let calls = Arc::new(AtomicU32::new(0));
    let dependency = service_fn(move |order: u32| {
        let n = calls.fetch_add(1, Ordering::Relaxed);
        async move {
            let delay = if n % 3 == 2 { 1000 } else { 5 };
            tokio::time::sleep(Duration::from_millis(delay)).await;
            Ok::<_, BoxError>(format!("order {order} stored"))
        }
    });

    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_millis(500))?)
        .layer(BulkheadLayer::new(4)?)
        .layer(AttemptTimeoutLayer::new(Duration::from_millis(100))?)
        .service(dependency);

    let classifier = ErrorClassifier::new();
    let started = tokio::time::Instant::now();
    let results = futures_join(client, 12).await;
    for (order, result) in results.iter().enumerate() {
        let class = classifier.classify(result.as_ref());
        match result {
            Ok(msg) => println!("order {order:>2}: ok        {msg}"),
            Err(e) => println!(
                "order {order:>2}: {:<9} {e} (retryable: {}, shed by bulkhead: {})",
                format!("{:?}", class.class()).to_lowercase(),
                class.is_retryable(),
                find_cause::<postbox::bulkhead::error::Full>(&**e).is_some(),
            ),
        }
    }
    println!(
        "12 calls in {:?}: none waited the second a hung attempt takes",
        started.elapsed()
    );
    Ok(())
}

/// Starts `n` calls at once on clones of `client` and collects the results in order.
async fn futures_join<S>(client: S, n: u32) -> Vec<Result<String, BoxError>>
where
    S: tower::Service<u32, Response = String, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let handles: Vec<_> = (0..n)
        .map(|i| tokio::spawn(client.clone().oneshot(i)))
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task panicked"));
    }
    out
}
