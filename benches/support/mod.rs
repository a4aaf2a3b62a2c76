//! Helpers shared by the criterion benches.
#![allow(dead_code, reason = "each bench uses a subset")]

use criterion::Criterion;
use postbox::BoxError;
use std::future::{Ready, ready};
use std::hint::black_box;
use tokio::time::Instant;
use tower::{Service, ServiceExt, service_fn};

/// A service that answers at once.
pub(crate) fn inner()
-> impl Service<u64, Response = u64, Error = BoxError, Future = Ready<Result<u64, BoxError>>> + Clone
{
    service_fn(|x: u64| ready(Ok::<_, BoxError>(x)))
}

/// A tower retry policy that never retries (but clones the request, as any retrying
/// policy must before the first attempt).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Never;

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for Never {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut Req, _: &mut Result<Res, E>) -> Option<Self::Future> {
        None
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// Benches `ready().await` + `call().await` through `svc` on `rt`, under `id`.
pub(crate) fn bench_service<S>(c: &mut Criterion, rt: &tokio::runtime::Runtime, id: &str, svc: S)
where
    S: Service<u64> + Clone + 'static,
    S::Error: std::fmt::Debug,
{
    c.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let mut svc = svc.clone();
            async move {
                let start = Instant::now();
                for i in 0..iters {
                    let ready = svc.ready().await.unwrap();
                    black_box(ready.call(black_box(i)).await.unwrap());
                }
                start.elapsed()
            }
        })
    });
}

/// A current-thread runtime with time enabled.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}
