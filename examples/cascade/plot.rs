//! `--plot`: answers per second for every mode on one time axis, as a hand-written SVG.

use crate::scenario::{Mode, Report, Scenario};
use std::fmt::Write;
use std::time::Duration;

const WIDTH: f64 = 900.0;
const PANEL: f64 = 170.0;
const GAP: f64 = 40.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 70.0;
const TOP: f64 = 60.0;

const OK: &str = "#2e7d32";
const ACCEPTED: &str = "#1565c0";
const FAILED: &str = "#c62828";

/// The SVG document.
pub(crate) fn svg(scenario: &Scenario, results: &[(Mode, Report)]) -> String {
    let seconds = results
        .iter()
        .map(|(_, r)| r.per_second.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let peak = results
        .iter()
        .flat_map(|(_, r)| r.per_second.iter())
        .map(|s| s.ok + s.accepted + s.failed)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    // The latency line shares one right-hand scale across the panels.
    let slowest = results
        .iter()
        .flat_map(|(_, r)| r.per_second.iter())
        .map(|s| s.max_ms)
        .fold(1.0_f64, f64::max);
    let plot_w = WIDTH - LEFT - RIGHT;
    let height = TOP + results.len() as f64 * (PANEL + GAP) + 30.0;
    let x = |t: f64| LEFT + plot_w * t / seconds as f64;
    let secs = |d: Duration| d.as_secs_f64().min(seconds as f64);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">cascade: answers per second at the load generator ({} req/s)</text>"#,
        scenario.rate
    );
    // Legend.
    let legend = [
        (OK, "2xx"),
        (ACCEPTED, "202 accepted"),
        (FAILED, "failed"),
        ("#9e9e9e", "MS5 down"),
        ("#ffb300", "MS5 slow"),
        ("#000000", "max latency (right axis)"),
    ];
    for (i, (color, label)) in legend.iter().enumerate() {
        let lx = LEFT + i as f64 * 115.0;
        let opacity = if i == 3 || i == 4 { 0.3 } else { 1.0 };
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="34" width="12" height="12" fill="{color}" fill-opacity="{opacity}"/><text x="{}" y="45">{label}</text>"#,
            lx + 16.0
        );
    }
    for (i, (mode, r)) in results.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL + GAP) + 20.0;
        let bottom = top + PANEL;
        let y = |v: f64| bottom - PANEL * v / peak;
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">{mode}: {} ok, {} accepted, {} failed, {} lost, {} duplicates</text>"#,
            top - 6.0,
            r.ok,
            r.accepted,
            r.failed,
            r.lost,
            r.duplicates
        );
        // The outage windows behind the bars.
        for ((from, to), color) in [(scenario.down, "#9e9e9e"), (scenario.slow, "#ffb300")] {
            if to > from {
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{top}" width="{:.1}" height="{PANEL}" fill="{color}" fill-opacity="0.3"/>"#,
                    x(secs(from)),
                    x(secs(to)) - x(secs(from))
                );
            }
        }
        // Stacked bars: ok at the bottom, then accepted, then failed.
        let bar = plot_w / seconds as f64 * 0.8;
        for (t, sec) in r.per_second.iter().enumerate() {
            let bx = x(t as f64) + plot_w / seconds as f64 * 0.1;
            let mut base = 0.0;
            for (count, color) in [(sec.ok, OK), (sec.accepted, ACCEPTED), (sec.failed, FAILED)] {
                if count == 0 {
                    continue;
                }
                let v = count as f64;
                let _ = writeln!(
                    s,
                    r#"<rect x="{bx:.1}" y="{:.1}" width="{bar:.1}" height="{:.1}" fill="{color}"><title>{t}s: {count}</title></rect>"#,
                    y(base + v),
                    y(base) - y(base + v)
                );
                base += v;
            }
        }
        // Max latency per second, on the right-hand scale.
        let points: Vec<String> = r
            .per_second
            .iter()
            .enumerate()
            .map(|(t, sec)| {
                format!(
                    "{:.1},{:.1}",
                    x(t as f64 + 0.5),
                    bottom - PANEL * sec.max_ms / slowest
                )
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="black" stroke-width="1.5"/>"#,
            points.join(" ")
        );
        for v in [0.0, slowest / 2.0, slowest] {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}">{v:.0} ms</text>"#,
                WIDTH - RIGHT + 6.0,
                bottom - PANEL * v / slowest + 4.0
            );
        }
        // Axes.
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/><line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="black"/><line x1="{right}" y1="{top}" x2="{right}" y2="{bottom}" stroke="black"/>"#,
            right = WIDTH - RIGHT
        );
        for v in [0.0, peak / 2.0, peak] {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{v:.0}</text>"#,
                LEFT - 6.0,
                y(v) + 4.0
            );
        }
        let step = (seconds / 12).max(1);
        for t in (0..=seconds).step_by(step) {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{t}s</text>"#,
                x(t as f64),
                bottom + 15.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
