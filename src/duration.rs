//! Durations in configuration: a number and a unit, `"250ms"`, `"2s"`, `"1.5s"`, `"1m"`.
//!
//! Every serde config of the crate (each layer's, and the stacks of [`config`](crate)
//! with the `config` feature) reads durations with [`parse`].

use serde::{Deserialize, Deserializer, de::Error};
use std::time::Duration;

/// The units a config duration may use.
pub const UNITS: &str = "ns, us, ms, s, m, h";

/// `d` in nanoseconds, saturating at `u64::MAX` (about 584 years) instead of keeping
/// the low 64 bits as `as u64` does.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Parses `"250ms"`, `"2s"`, `"1.5s"`, `"1m"`, `"1h"`, `"100us"`, `"10ns"`.
///
/// # Errors
/// A message naming the value and what is wrong: no unit, an unknown unit (`"250
/// parsecs"`), not a number, negative or too large.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use postbox::duration::parse;
///
/// assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
/// assert!(parse("250 parsecs").unwrap_err().contains("unknown unit `parsecs`"));
/// ```
pub fn parse(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    if num.is_empty() {
        return Err(format!(
            "invalid duration `{s}`: expected a number and a unit ({UNITS}), e.g. \"250ms\""
        ));
    }
    if unit.is_empty() {
        return Err(format!(
            "invalid duration `{s}`: missing unit (one of {UNITS}), e.g. \"{num}ms\""
        ));
    }
    let secs_per_unit = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "invalid duration `{s}`: unknown unit `{unit}` (expected one of {UNITS})"
            ));
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration `{s}`: `{num}` is not a number"))?;
    Duration::try_from_secs_f64(value * secs_per_unit)
        .map_err(|e| format!("invalid duration `{s}`: {e}"))
}

/// Formats a duration the way [`parse`] reads it (`"250ms"`, `"2s"`, `"1m"`).
pub fn format(d: Duration) -> String {
    let ns = d.as_nanos();
    for (per, unit) in [
        (3_600_000_000_000u128, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
    ] {
        if ns >= per && ns.is_multiple_of(per) {
            return format!("{}{unit}", ns / per);
        }
    }
    if ns >= 1_000_000_000 {
        return format!("{}s", d.as_secs_f64());
    }
    format!("{ns}ns")
}

/// `#[serde(deserialize_with = "...")]` for a required duration.
pub(crate) fn required<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse(&s).map_err(D::Error::custom)
}

/// `#[serde(deserialize_with = "...")]` for an optional duration (absent: `None`).
pub(crate) fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| parse(&s).map_err(D::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_names_bad_ones() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse(" 1m "), Ok(Duration::from_secs(60)));
        assert_eq!(parse("100us"), Ok(Duration::from_micros(100)));
        assert!(parse("250").unwrap_err().contains("missing unit"));
        assert!(parse("ms").unwrap_err().contains("expected a number"));
        assert!(
            parse("250 parsecs")
                .unwrap_err()
                .contains("unknown unit `parsecs`")
        );
        assert!(parse("1.2.3s").unwrap_err().contains("not a number"));
    }

    #[test]
    fn format_round_trips() {
        for s in ["250ms", "2s", "1m", "1h", "100us", "7ns"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
    }
}
