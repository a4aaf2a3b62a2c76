//! Runs N calls through one circuit-breaker path, for counting instructions per call:
//! nanosecond benches on a shared 2-core VM move by ±30 %, instruction counts do not.
//!
//! ```text
//! cargo build --release --example breaker_calls
//! B=target/release/examples/breaker_calls   # or under $CARGO_TARGET_DIR
//! for p in bare closed open failing time_window; do
//!   a=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null $B $p 10000 2>&1 | awk '/Collected/ {print $4}')
//!   b=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null $B $p 20000 2>&1 | awk '/Collected/ {print $4}')
//!   echo "$p $(( (b - a) / 10000 )) instructions/call"
//! done
//! ```
//!
//! The paths are those of `benches/circuit_breaker.rs`: `ready().await` then
//! `call().await` on a `service_fn` that answers at once; `failing` fails every call in
//! metrics-only mode (thresholds unreachable).

use postbox::BoxError;
use postbox::circuit_breaker::CircuitBreakerLayer;
use std::fmt;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::time::Duration;
use tower::{Layer, Service, ServiceExt, service_fn};

/// A zero-sized error: failing costs no allocation in the inner service.
#[derive(Debug)]
struct Down;

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("down")
    }
}

impl std::error::Error for Down {}

fn ok_fn(x: u32) -> Ready<Result<u32, BoxError>> {
    ready(Ok(x))
}

fn fail_fn(_: u32) -> Ready<Result<u32, BoxError>> {
    ready(Err(Box::new(Down)))
}

async fn drive<S>(mut svc: S, n: u32)
where
    S: Service<u32, Response = u32>,
    S::Error: fmt::Debug,
{
    for i in 0..n {
        let res = match svc.ready().await {
            Ok(s) => s.call(black_box(i)).await,
            Err(e) => Err(e),
        };
        let _ = black_box(res);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: breaker_calls bare|closed|open|failing|time_window CALLS";
    let path = args.next().ok_or(usage)?;
    let n: u32 = args.next().ok_or(usage)?.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    rt.block_on(async {
        match path.as_str() {
            "bare" => drive(service_fn(ok_fn), n).await,
            "closed" => {
                let layer = CircuitBreakerLayer::builder().build()?;
                drive(layer.layer(service_fn(ok_fn)), n).await
            }
            "open" => {
                let layer = CircuitBreakerLayer::builder()
                    .consecutive_failures(1)
                    .break_duration(Duration::from_secs(3600))
                    .build()?;
                let _ = layer.layer(service_fn(fail_fn)).oneshot(0).await;
                drive(layer.layer(service_fn(ok_fn)), n).await
            }
            "failing" => {
                let layer = CircuitBreakerLayer::builder()
                    .count_window(100)
                    .minimum_calls(100)
                    .build()?;
                layer.handle().metrics_only();
                drive(layer.layer(service_fn(fail_fn)), n).await
            }
            "time_window" => {
                let layer = CircuitBreakerLayer::builder()
                    .time_window(Duration::from_secs(10), 10)
                    .build()?;
                drive(layer.layer(service_fn(ok_fn)), n).await
            }
            _ => return Err(usage.into()),
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
