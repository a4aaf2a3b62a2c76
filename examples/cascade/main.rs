//! The cascade demo: five services in a chain, MS1 → MS2 → MS3 → MS4 → MS5, each
//! calling the next over HTTP with reqwest. A load generator sends orders to MS1 (one
//! `Idempotency-Key` each, forwarded by every hop) while MS5 goes down — a hard stop:
//! its listener is closed and its connections cut, so connections are refused — comes
//! back on the same port, then turns slow. The same scenario runs in three modes:
//!
//! | mode | each hop's client | servers |
//! |---|---|---|
//! | `plain` | reqwest | axum; a downstream error becomes a `502` |
//! | `guarded` | deadline → retry + budget → bulkhead → circuit breaker (each per authority) → attempt timeout → reqwest | `ErrorResponseLayer`, inbound deadline, fail-fast bulkhead |
//! | `postbox` | enqueue fallback (embedded queue, a replayer) → the `guarded` stack | the same, plus `Idempotency` on MS5 |
//!
//! Each client stack is built from one validated `ClientConfig`: the
//! `standard_http_client` preset with this demo's times (see `client_config` in
//! `scenario.rs`).
//!
//! The time budgets shrink down the chain (MS4 → MS5: 250 ms per attempt, 600 ms in
//! all; each hop above: 500 ms more), so the deepest caller gives up first and,
//! with postbox, defers the order and answers `202 Accepted` before anyone above it
//! times out.
//!
//! Every number comes from the run: the load generator records every answer, MS5's
//! handler counts the orders it applied per idempotency key. *Lost* is an order
//! answered 2xx or 202 that MS5 never applied; *duplicates* are orders MS5 applied
//! more than once.
//!
//! ```sh
//! cargo run --release --example cascade
//! cargo run --release --example cascade -- --json --plot cascade.svg
//! cargo run --release --example cascade -- --modes plain,postbox --down 2-6 --slow 6-8
//! cargo run --release --example cascade -- --help
//! ```
//!
//! Everything runs on 127.0.0.1 and ends by itself; the queues live in temporary
//! folders, removed at the end of each mode's run, or on Ctrl-C.

mod plot;
mod report;
mod scenario;

use scenario::{Mode, Report, Scenario};
use std::time::Duration;

const HELP: &str = "\
cascade: five services MS1 -> MS5; MS5 goes down, then slow; three stacks compared.

USAGE: cargo run --release --example cascade -- [OPTIONS]

OPTIONS:
  --duration SECS        how long the load runs              [default: 12]
  --rate N               requests per second to MS1          [default: 100]
  --down FROM-TO         MS5 refuses connections, in seconds [default: 3-7]
  --slow FROM-TO         MS5 answers after --slow-delay      [default: 7-9]
  --slow-delay MS        MS5's delay while slow, in ms       [default: 1500]
  --drain SECS           bound on the wait for replays       [default: 30]
  --modes LIST           comma-separated: plain,guarded,postbox [default: all]
  --json                 print one JSON object instead of tables
  --plot FILE.svg        draw answers per second for every mode
  -h, --help             this text
";

struct Args {
    scenario: Scenario,
    modes: Vec<Mode>,
    json: bool,
    plot: Option<String>,
}

fn secs(v: &str, flag: &str) -> Result<Duration, String> {
    v.parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("{flag}: expected seconds, got {v:?}"))
}

fn window(v: &str, flag: &str) -> Result<(Duration, Duration), String> {
    let (from, to) = v
        .split_once('-')
        .ok_or_else(|| format!("{flag}: expected FROM-TO in seconds, got {v:?}"))?;
    let (from, to) = (secs(from, flag)?, secs(to, flag)?);
    if from > to {
        return Err(format!("{flag}: {v:?} ends before it starts"));
    }
    Ok((from, to))
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut out = Args {
        scenario: Scenario::default(),
        modes: Mode::ALL.to_vec(),
        json: false,
        plot: None,
    };
    let mut args = args.peekable();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag}: missing value"));
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--json" => out.json = true,
            "--plot" => out.plot = Some(value()?),
            "--duration" => out.scenario.duration = secs(&value()?, "--duration")?,
            "--rate" => {
                let v = value()?;
                out.scenario.rate = v
                    .parse()
                    .ok()
                    .filter(|r| *r > 0)
                    .ok_or_else(|| format!("--rate: expected a positive integer, got {v:?}"))?;
            }
            "--down" => out.scenario.down = window(&value()?, "--down")?,
            "--slow" => out.scenario.slow = window(&value()?, "--slow")?,
            "--slow-delay" => {
                let v = value()?;
                let ms: u64 = v
                    .parse()
                    .map_err(|_| format!("--slow-delay: expected milliseconds, got {v:?}"))?;
                out.scenario.slow_delay = Duration::from_millis(ms);
            }
            "--drain" => out.scenario.drain_timeout = secs(&value()?, "--drain")?,
            "--modes" => {
                let v = value()?;
                out.modes.clear();
                for m in v.split(',') {
                    let mode = Mode::parse(m.trim())
                        .ok_or_else(|| format!("--modes: unknown mode {m:?}"))?;
                    if !out.modes.contains(&mode) {
                        out.modes.push(mode);
                    }
                }
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if out.scenario.duration.is_zero() {
        return Err("--duration: must be greater than zero".into());
    }
    if out.modes.is_empty() {
        return Err("--modes: no mode given".into());
    }
    // One task per order: past this, memory, not the cascade, is what is measured.
    let orders = out.scenario.duration.as_secs_f64() * f64::from(out.scenario.rate);
    if orders > 1e6 {
        return Err(format!(
            "--rate × --duration: {orders:.0} orders per mode, more than a million"
        ));
    }
    Ok(Some(out))
}

/// While MS5 is slow, `plain` keeps about `rate × slow delay` requests in flight, each
/// holding ten sockets (both ends of five connections). Warns when the soft limit on
/// open files (read from `/proc` on Linux; elsewhere not checked) is lower than that.
fn warn_on_low_fd_limit(s: &Scenario) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok());
    let need = (f64::from(s.rate) * s.slow_delay.as_secs_f64() * 10.0) as u64 + 256;
    if let Some(soft) = soft.filter(|soft| *soft < need) {
        eprintln!(
            "warning: the open-file limit is {soft}; plain mode may need about {need} sockets \
             while MS5 is slow, and would then fail for lack of them. Raise it first: \
             ulimit -n {}",
            need.next_power_of_two()
        );
    }
}

#[tokio::main]
async fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{HELP}");
            return;
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let s = &args.scenario;
    if !args.json {
        println!(
            "cascade: MS1 -> MS2 -> MS3 -> MS4 -> MS5 on 127.0.0.1, {} req/s for {:?}; \
             MS5 down {:?}-{:?}, slow ({} ms per request) {:?}-{:?}\n",
            s.rate,
            s.duration,
            s.down.0,
            s.down.1,
            s.slow_delay.as_millis(),
            s.slow.0,
            s.slow.1
        );
    }
    warn_on_low_fd_limit(s);
    let mut results: Vec<(Mode, Report)> = Vec::new();
    for &mode in &args.modes {
        if !args.json {
            eprintln!("running {mode} ...");
        }
        // Ctrl-C drops the run, and with it its temporary queue folders.
        let run = tokio::select! {
            run = scenario::run(mode, s) => Some(run),
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(run) = run else {
            eprintln!("interrupted");
            std::process::exit(130);
        };
        match run {
            Ok(r) => {
                if !args.json {
                    report::print_table(mode, &r);
                }
                results.push((mode, r));
            }
            Err(e) => {
                eprintln!("error: the {mode} run failed: {e}");
                std::process::exit(1);
            }
        }
    }
    if args.json {
        println!("{}", report::json(&results));
    } else {
        report::print_summary(&results);
    }
    if let Some(path) = &args.plot {
        let svg = plot::svg(s, &results);
        if let Err(e) = std::fs::write(path, svg) {
            eprintln!("error: writing {path}: {e}");
            std::process::exit(1);
        }
        if !args.json {
            println!("plot written to {path}");
        }
    }
}
