//! Per-call cost of the circuit breaker against a bare service and against
//! tower-resilience's circuit breaker.
//!
//! Every iteration is `ready().await` + `call().await` on a `service_fn` that answers
//! at once. `failing` fails every call while no threshold can be reached: postbox's
//! breaker is put in metrics-only mode (it records and evaluates the window, but never
//! trips: a count window caps `minimum_calls` at its size, so a 100 % failure rate
//! would otherwise trip it); tower-resilience gets an unreachable minimum number of
//! calls.
//!
//! Run: `cargo bench --bench circuit_breaker -- --warm-up-time 1 --measurement-time 3`

use criterion::{Criterion, criterion_group, criterion_main};
use postbox::BoxError;
use postbox::circuit_breaker::CircuitBreakerLayer;
use std::fmt;
use std::future::ready;
use std::hint::black_box;
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

#[path = "support/breaker_paths.rs"]
mod paths;

use paths::{fail_fn, ok_fn};

/// Times `iters` calls of one service.
fn drive<S, E>(c: &mut Criterion, rt: &Runtime, id: &str, make: impl Fn() -> S)
where
    S: Service<u32, Response = u32, Error = E>,
    E: fmt::Debug,
{
    c.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let mut svc = make();
            async move {
                let start = Instant::now();
                for i in 0..iters {
                    let s = svc.ready().await;
                    let res = match s {
                        Ok(s) => s.call(black_box(i as u32)).await,
                        Err(e) => Err(e),
                    };
                    let _ = black_box(res);
                }
                start.elapsed()
            }
        })
    });
}

/// Times `iters` calls spread over `callers` tasks sharing one breaker.
fn drive_shared<S>(c: &mut Criterion, rt: &Runtime, id: &str, callers: u64, make: impl Fn() -> S)
where
    S: Service<u32, Response = u32> + Send + 'static,
    S::Error: fmt::Debug + Send,
    S::Future: Send,
{
    c.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let tasks: Vec<_> = (0..callers).map(|_| make()).collect();
            async move {
                let per = iters.div_ceil(callers);
                let start = Instant::now();
                let handles: Vec<_> = tasks
                    .into_iter()
                    .map(|mut svc| {
                        tokio::spawn(async move {
                            for i in 0..per {
                                let s = svc.ready().await.unwrap();
                                let _ = black_box(s.call(black_box(i as u32)).await);
                            }
                        })
                    })
                    .collect();
                for h in handles {
                    h.await.unwrap();
                }
                start.elapsed()
            }
        })
    });
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();

    drive(c, &rt, "bare", || service_fn(ok_fn));

    // --- postbox ---
    let closed = paths::closed();
    drive(c, &rt, "postbox/breaker/closed", || {
        closed.layer(service_fn(ok_fn))
    });

    let open = rt.block_on(paths::open());
    drive(c, &rt, "postbox/breaker/open", || {
        open.layer(service_fn(ok_fn))
    });

    let failing = paths::failing();
    drive(c, &rt, "postbox/breaker/failing", || {
        failing.layer(service_fn(fail_fn))
    });

    let time = paths::time_window();
    drive(c, &rt, "postbox/breaker/time_window", || {
        time.layer(service_fn(ok_fn))
    });

    // --- keyed by authority (the config client stack's breaker) ---
    // The same request construction with and without the layer, so the ratio is the
    // layer's cost: key extraction, the key map's lock, the breaker.
    let uri: http::Uri = "http://orders.internal:8080/orders".parse().unwrap();
    let request = move |_: u32| http::Request::builder().uri(uri.clone()).body(()).unwrap();
    let http_ok = |_: http::Request<()>| ready(Ok::<u32, BoxError>(0));
    drive(c, &rt, "bare/http", || {
        service_fn(http_ok).map_request(request.clone())
    });
    let keyed = CircuitBreakerLayer::builder()
        .keyed_by_authority()
        .build()
        .unwrap();
    drive(c, &rt, "postbox/breaker/keyed_by_authority", || {
        keyed
            .layer(service_fn(http_ok))
            .map_request(request.clone())
    });

    // --- tower-resilience ---
    use tower_resilience_circuitbreaker::CircuitBreakerLayer as Peer;
    let peer_closed = Peer::builder().build().unwrap();
    drive(c, &rt, "peer/tower_resilience/closed", || {
        peer_closed.layer(service_fn(ok_fn))
    });

    let peer_open = Peer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(1)
        .minimum_number_of_calls(1)
        .wait_duration_in_open(Duration::from_secs(3600))
        .build()
        .unwrap();
    let peer_open_svc = peer_open.layer(service_fn(fail_fn));
    rt.block_on(peer_open_svc.clone().oneshot(0)).unwrap_err();
    assert!(peer_open_svc.is_open());
    drive(c, &rt, "peer/tower_resilience/open", || {
        peer_open_svc.clone()
    });

    let peer_failing = Peer::builder()
        .sliding_window_size(100)
        .minimum_number_of_calls(usize::MAX)
        .build()
        .unwrap();
    drive(c, &rt, "peer/tower_resilience/failing", || {
        peer_failing.layer(service_fn(fail_fn))
    });

    // --- one breaker shared by 4 callers on 2 workers, against 1 caller ---
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let shared = CircuitBreakerLayer::builder().build().unwrap();
    drive_shared(c, &mt, "postbox/breaker/shared/1_caller", 1, || {
        shared.layer(service_fn(ok_fn))
    });
    drive_shared(
        c,
        &mt,
        "postbox/breaker/shared/4_callers_2_workers",
        4,
        || shared.layer(service_fn(ok_fn)),
    );
    drive_shared(c, &mt, "bare/shared/1_caller", 1, || service_fn(ok_fn));
    drive_shared(c, &mt, "bare/shared/4_callers_2_workers", 4, || {
        service_fn(ok_fn)
    });
}

criterion_group!(breaker, benches);
criterion_main!(breaker);
