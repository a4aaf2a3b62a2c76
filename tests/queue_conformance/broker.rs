//! Helpers shared by the broker modules of the suite.

use postbox::queue::QueueError;
use std::future::Future;
use std::time::Duration;

/// Connects with `connect`, allowing a slow moment before calling the server
/// unreachable (tests run in parallel against shared servers on a small machine), then
/// fails loudly: `what` is not reachable at `url`, and `hint` says how to start it.
pub async fn connect_patiently<Q, F, Fut>(what: &str, url: &str, hint: &str, connect: F) -> Q
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Q, QueueError>>,
{
    for _ in 0..2 {
        if let Ok(q) = connect().await {
            return q;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    connect()
        .await
        .unwrap_or_else(|e| panic!("{what} is not reachable at {url}: {e}. {hint}"))
}

/// Runs `f` to completion from synchronous code inside a multi-thread runtime (the
/// `conformance!` constructors are synchronous).
pub fn block_on<F: Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
