//! The tables and the JSON.

use crate::scenario::{Mode, Report};

fn describe(mode: Mode) -> &'static str {
    match mode {
        Mode::Plain => "no layers: reqwest only",
        Mode::Guarded => "deadline + retry + breaker + bulkhead + attempt timeout",
        Mode::Postbox => "enqueue fallback + the guarded stack; idempotency on MS5",
    }
}

/// Prints one mode's table.
pub(crate) fn print_table(mode: Mode, r: &Report) {
    let rows: [(&str, String); 13] = [
        ("requests sent", r.sent.to_string()),
        ("answered 2xx synchronously", r.ok.to_string()),
        ("accepted (202, deferred)", r.accepted.to_string()),
        ("failed", r.failed.to_string()),
        (
            "latency p50 / p99 / max",
            format!("{:.1} / {:.1} / {:.1} ms", r.p50_ms, r.p99_ms, r.max_ms),
        ),
        ("peak in-flight at MS1", r.peak_in_flight.to_string()),
        (
            "drain after the load",
            if mode != Mode::Postbox {
                "- (no queue)".to_owned()
            } else if r.drained {
                format!("{:.1} s", r.drain.as_secs_f64())
            } else {
                format!("timed out after {:.1} s", r.drain.as_secs_f64())
            },
        ),
        ("messages replayed", r.replayed.to_string()),
        ("orders applied at MS5", r.applied.to_string()),
        ("duplicates applied", r.duplicates.to_string()),
        (
            "repeats answered by MS5's store",
            r.deduplicated.to_string(),
        ),
        ("lost", r.lost.to_string()),
        ("dead-lettered", r.dead_lettered.to_string()),
    ];
    let title = format!("{mode} ({})", describe(mode));
    println!("{title}");
    println!("{}", "-".repeat(title.chars().count()));
    for (name, value) in rows {
        println!("  {name:<32} {value:>20}");
    }
    println!();
}

/// Prints the modes side by side.
pub(crate) fn print_summary(results: &[(Mode, Report)]) {
    if results.len() < 2 {
        return;
    }
    let mut header = format!("| {:<22} |", "");
    let mut rule = format!("|{}|", "-".repeat(24));
    for (mode, _) in results {
        header.push_str(&format!(" {:>10} |", mode.name()));
        rule.push_str(&format!("{}:|", "-".repeat(11)));
    }
    println!("{header}");
    println!("{rule}");
    type Cell = fn(&Report) -> String;
    let rows: [(&str, Cell); 12] = [
        ("sent", |r| r.sent.to_string()),
        ("ok (2xx)", |r| r.ok.to_string()),
        ("accepted (202)", |r| r.accepted.to_string()),
        ("failed", |r| r.failed.to_string()),
        ("p50 latency (ms)", |r| format!("{:.1}", r.p50_ms)),
        ("p99 latency (ms)", |r| format!("{:.1}", r.p99_ms)),
        ("max latency (ms)", |r| format!("{:.1}", r.max_ms)),
        ("peak in-flight at MS1", |r| r.peak_in_flight.to_string()),
        ("replayed", |r| r.replayed.to_string()),
        ("applied at MS5", |r| r.applied.to_string()),
        ("duplicates", |r| r.duplicates.to_string()),
        ("lost", |r| r.lost.to_string()),
    ];
    for (name, cell) in rows {
        let mut line = format!("| {name:<22} |");
        for (_, r) in results {
            line.push_str(&format!(" {:>10} |", cell(r)));
        }
        println!("{line}");
    }
    println!();
}

/// `{"modes": {"plain": {...}, ...}}`, modes in the order they ran.
pub(crate) fn json(results: &[(Mode, Report)]) -> String {
    let modes: Vec<String> = results
        .iter()
        .map(|(mode, r)| {
            let body = serde_json::to_string(r).expect("a report serializes");
            format!("{}:{body}", serde_json::Value::from(mode.name()))
        })
        .collect();
    format!("{{\"modes\":{{{}}}}}", modes.join(","))
}
