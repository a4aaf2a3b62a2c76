//! Per-call cost of the retry layer when no retry is needed, next to tower's `Retry`
//! with a policy that never retries.
//!
//! Each iteration is `ready().await` + `call().await` through a `service_fn` that
//! answers at once, on a current-thread runtime.
//!
//! `cargo bench --bench retry`

#[path = "support/mod.rs"]
mod support;

use criterion::{Criterion, criterion_group, criterion_main};
use postbox::retry::{RetryBudget, RetryLayer};
use support::{Never, bench_service, inner, runtime};
use tower::Layer;

fn retry(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();

    bench_service(c, &rt, "bare", inner());
    bench_service(
        c,
        &rt,
        "tower/retry_never",
        tower::retry::RetryLayer::new(Never).layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "postbox/retry/no_retry_needed",
        RetryLayer::builder()
            .no_budget()
            .build()
            .unwrap()
            .layer(inner()),
    );
    bench_service(
        c,
        &rt,
        "postbox/retry/with_budget",
        RetryLayer::builder()
            .budget(RetryBudget::new())
            .build()
            .unwrap()
            .layer(inner()),
    );
}

criterion_group!(benches, retry);
criterion_main!(benches);
