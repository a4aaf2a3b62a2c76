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
    let ns_per_unit: u128 = match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => {
            return Err(format!(
                "invalid duration `{s}`: unknown unit `{unit}` (expected one of {UNITS})"
            ));
        }
    };
    // In integers, exactly (a float loses nanoseconds, and cannot reach `Duration::MAX`,
    // which `format` writes): whole units, then the fraction down to the nanosecond.
    let not_a_number = || format!("invalid duration `{s}`: `{num}` is not a number");
    let too_large = || format!("invalid duration `{s}`: too large");
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(not_a_number());
    }
    let whole: u128 = match whole {
        "" => 0,
        w => w.parse().map_err(|_| too_large())?,
    };
    let whole_frac = frac;
    // Digits past the 18th are below a nanosecond for every unit.
    let frac = &frac[..frac.len().min(18)];
    let frac_ns = match frac {
        "" => 0,
        f => {
            f.parse::<u128>().map_err(|_| not_a_number())? * ns_per_unit
                / 10u128.pow(f.len() as u32)
        }
    };
    let ns = whole
        .checked_mul(ns_per_unit)
        .and_then(|n| n.checked_add(frac_ns))
        .ok_or_else(too_large)?;
    // Not zero, but below a nanosecond: read as 0 it would change what the field means.
    if ns == 0 && whole_frac.bytes().any(|b| b != b'0') {
        return Err(format!(
            "invalid duration `{s}`: below a nanosecond (write \"0s\" for none)"
        ));
    }
    let secs = u64::try_from(ns / 1_000_000_000).map_err(|_| too_large())?;
    Ok(Duration::new(secs, (ns % 1_000_000_000) as u32))
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
    // Exact, up to `Duration::MAX` ("keep it" for a ttl).
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

/// `#[serde(deserialize_with = "...")]` for a duration that can be switched off:
/// `"off"` (or `null`) is `None`, any other text a duration (absent: the field's
/// default).
pub(crate) fn or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.trim().eq_ignore_ascii_case("off") => Ok(None),
        Some(s) => parse(&s).map(Some).map_err(D::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every duration formats to text that parses back to it exactly, up to
    /// `Duration::MAX` (it was written as `18446744073709552000s`, which parse refused,
    /// and nanoseconds were lost through a float).
    #[test]
    fn format_and_parse_round_trip_exactly() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_nanos(1_234_567_891),
            Duration::new(86_400, 1),
            Duration::from_millis(1500),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ] {
            assert_eq!(parse(&format(d)), Ok(d), "{}", format(d));
        }
        assert_eq!(parse("0.5h"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse(".25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1.000000001s"), Ok(Duration::new(1, 1)));
        assert!(parse("1.2.3s").unwrap_err().contains("not a number"));
        assert!(parse(".s").unwrap_err().contains("not a number"));
        // The spelling the error for a value below a nanosecond suggests parses.
        let below = parse("0.1ns").unwrap_err();
        let (_, hint) = below.split_once("write \"").unwrap();
        let (hint, _) = hint.split_once('"').unwrap();
        assert_eq!(parse(hint), Ok(Duration::ZERO), "{below}");
        assert!(
            parse("18446744073709551616s")
                .unwrap_err()
                .contains("too large")
        );
    }

    /// A value that is not zero but below a nanosecond is refused, not read as 0 (which
    /// means "none" for some fields, and was refused as "must be greater than zero" for
    /// others).
    #[test]
    fn a_duration_below_a_nanosecond_is_refused_not_read_as_zero() {
        // The last two: a non-zero digit only past the 18th (it was cut off first).
        for s in [
            "0.1ns",
            "0.0000000001s",
            ".5ns",
            "0.0000000000000000001s",
            "0.00000000000000000001h",
        ] {
            assert!(parse(s).unwrap_err().contains("below a nanosecond"), "{s}");
        }
        assert_eq!(parse("0.0s"), Ok(Duration::ZERO));
        assert_eq!(parse("0ns"), Ok(Duration::ZERO));
        assert_eq!(parse("1.5ns"), Ok(Duration::from_nanos(1)));
    }

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
