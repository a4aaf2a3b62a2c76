//! End to end: a shortened cascade (MS1 → … → MS5 on loopback, real sockets and real
//! time), in the `plain` and `postbox` modes. Plain fails while MS5 is down; postbox
//! answers every order (2xx or 202), then delivers each deferred one exactly once.

// The example uses more of these modules (flag parsing, every mode, the tables) than
// the test.
#[allow(dead_code)]
#[path = "../../examples/cascade/report.rs"]
mod report;
#[allow(dead_code)]
#[path = "../../examples/cascade/scenario.rs"]
mod scenario;

use scenario::{Mode, Report, Scenario};
use std::time::Duration;

/// A few seconds: MS5 down for a second, then slow for half a second.
fn short() -> Scenario {
    Scenario {
        duration: Duration::from_secs(3),
        rate: 50,
        down: (Duration::from_millis(800), Duration::from_millis(1800)),
        slow: (Duration::from_millis(1800), Duration::from_millis(2300)),
        slow_delay: Duration::from_millis(1000),
        // Bounds far above what a healthy run takes (the drain ends as soon as the
        // queues are empty): room for a loaded machine.
        drain_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(15),
    }
}

/// Failures among requests sent in whole seconds `from..to` of the load.
fn failed_in(r: &Report, from: usize, to: usize) -> u64 {
    r.per_second[from..to].iter().map(|s| s.failed).sum()
}

/// The example's `--json` output for these runs.
fn json(results: &[(Mode, Report)]) -> serde_json::Value {
    serde_json::from_str(&report::json(results)).expect("--json prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postbox_defers_through_the_outage_and_delivers_exactly_once() {
    let scenario = short();

    let plain = scenario::run(Mode::Plain, &scenario)
        .await
        .expect("plain run");
    let postbox = scenario::run(Mode::Postbox, &scenario)
        .await
        .expect("postbox run");
    let all = json(&[
        (Mode::Plain, plain.clone()),
        (Mode::Postbox, postbox.clone()),
    ]);

    let plain_json = &all["modes"]["plain"];
    assert!(
        plain_json["failed"].as_u64().unwrap() > 0,
        "plain: {plain_json}"
    );
    // The failures are the outage's: second 1 is entirely inside the down window.
    assert!(failed_in(&plain, 1, 2) > 0, "plain: {:?}", plain.per_second);
    assert_eq!(plain_json["accepted"], 0, "plain: {plain_json}");

    let j = &all["modes"]["postbox"];
    assert_eq!(j["sent"], 150, "postbox: {j}");
    assert_eq!(j["failed"], 0, "postbox: {j}");
    assert_eq!(j["lost"], 0, "postbox: {j}");
    assert_eq!(j["duplicates"], 0, "postbox: {j}");
    assert!(j["accepted"].as_u64().unwrap() > 0, "postbox: {j}");
    assert!(
        postbox.drained,
        "postbox: the queues did not drain in {:?}: {j}",
        postbox.drain
    );
    assert_eq!(postbox.dead_lettered, 0, "postbox: {j}");
    // Every order reached MS5, the deferred ones through the replayers.
    assert_eq!(j["applied"], 150, "postbox: {j}");
    assert!(
        j["replayed"].as_u64().unwrap() >= j["accepted"].as_u64().unwrap(),
        "postbox: {j}"
    );
    for field in [
        "sent",
        "ok",
        "accepted",
        "failed",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "peak_in_flight",
        "replayed",
        "applied",
        "duplicates",
        "lost",
        "deduplicated",
        "dead_lettered",
        "drained",
        "drain_s",
    ] {
        assert!(j.get(field).is_some(), "missing {field} in {j}");
    }
    assert_eq!(j["drained"], true, "postbox: {j}");
    assert_eq!(j["drain_s"].as_f64(), Some(postbox.drain.as_secs_f64()));
}
