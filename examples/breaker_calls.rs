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
//! The paths are those of `benches/circuit_breaker.rs`, from the same definitions
//! (`benches/support/breaker_paths.rs`): `ready().await` then `call().await` on a
//! `service_fn` that answers at once; `failing` fails every call in metrics-only mode
//! (thresholds unreachable).

#[path = "../benches/support/breaker_paths.rs"]
mod paths;

use paths::{fail_fn, ok_fn};
use std::fmt;
use std::hint::black_box;
use tower::{Layer, Service, ServiceExt, service_fn};

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
            "closed" => drive(paths::closed().layer(service_fn(ok_fn)), n).await,
            "open" => drive(paths::open().await.layer(service_fn(ok_fn)), n).await,
            "failing" => drive(paths::failing().layer(service_fn(fail_fn)), n).await,
            "time_window" => drive(paths::time_window().layer(service_fn(ok_fn)), n).await,
            _ => return Err(usage.into()),
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
