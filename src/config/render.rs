//! The effective configuration as TOML (`Display`), readable back by the loader.

use super::duration::format as d;
use super::{ClientConfig, ServerConfig, StackConfig};
use crate::circuit_breaker::WindowConfig;
use crate::retry::BackoffKind;
use crate::retry::backoff::Jitter;
use std::fmt::{self, Write};

fn kind(k: BackoffKind) -> &'static str {
    match k {
        BackoffKind::Constant => "constant",
        BackoffKind::Linear => "linear",
        BackoffKind::Exponential => "exponential",
    }
}

fn jitter(j: Jitter) -> &'static str {
    match j {
        Jitter::None => "none",
        Jitter::Full => "full",
        Jitter::Equal => "equal",
        Jitter::Decorrelated => "decorrelated",
    }
}

/// A float as TOML writes it: `nan`, `inf` and `-inf` by name (Rust's `NaN` is not
/// TOML), anything else with a decimal point.
fn float(x: f64) -> String {
    if x.is_nan() {
        "nan".to_owned()
    } else {
        format!("{x:?}")
    }
}

fn strings(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(|s| string(s)).collect();
    format!("[{}]", items.join(", "))
}

/// A TOML basic string: quotes, backslashes and control characters escaped (TOML's
/// `\uXXXX`, not Rust's `\u{..}`), everything else as it is.
fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() && (c as u32) < 0x80 => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes `[section]` lines for a client section under `p` (`client` or empty).
fn client(f: &mut impl Write, p: &str, c: &ClientConfig) -> fmt::Result {
    let t = |name: &str| {
        if p.is_empty() {
            format!("[{name}]")
        } else if name.is_empty() {
            format!("[{p}]")
        } else {
            format!("[{p}.{name}]")
        }
    };
    if !p.is_empty() {
        writeln!(f, "{}", t(""))?;
    }
    if let Some(preset) = &c.preset {
        writeln!(f, "preset = {}", string(preset))?;
    }
    writeln!(f, "deadline = {:?}", d(c.deadline))?;
    writeln!(f, "attempt_timeout = {:?}", d(c.attempt_timeout))?;
    writeln!(f, "buffer_body = {}", c.buffer_body)?;
    if !c.stream_through.is_empty() {
        writeln!(f, "stream_through = {}", strings(&c.stream_through))?;
    }

    let r = &c.retry;
    writeln!(f, "\n{}", t("retry"))?;
    writeln!(f, "max_retries = {}", r.max_retries)?;
    writeln!(f, "max_retry_after = {:?}", d(r.max_retry_after))?;
    if let Some(w) = r.max_open_wait {
        writeln!(f, "max_open_wait = {:?}", d(w))?;
    }
    writeln!(
        f,
        "generate_idempotency_key = {}",
        r.generate_idempotency_key
    )?;
    writeln!(f, "retry_unsafe_methods = {}", r.retry_unsafe_methods)?;
    if !r.idempotent_grpc_methods.is_empty() {
        writeln!(
            f,
            "idempotent_grpc_methods = {}",
            strings(&r.idempotent_grpc_methods)
        )?;
    }
    writeln!(f, "\n{}", t("retry.backoff"))?;
    writeln!(f, "kind = {:?}", kind(r.backoff.kind))?;
    writeln!(f, "base = {:?}", d(r.backoff.base))?;
    writeln!(f, "factor = {}", float(r.backoff.factor))?;
    writeln!(f, "max_delay = {:?}", d(r.backoff.max_delay))?;
    writeln!(f, "jitter = {:?}", jitter(r.backoff.jitter))?;
    writeln!(f, "\n{}", t("retry.budget"))?;
    writeln!(f, "enabled = {}", r.budget.enabled)?;
    writeln!(f, "ratio = {}", float(r.budget.ratio))?;
    writeln!(f, "min_retries_per_sec = {}", r.budget.min_retries_per_sec)?;
    writeln!(f, "ttl = {:?}", d(r.budget.ttl))?;

    let b = &c.circuit_breaker;
    writeln!(f, "\n{}", t("circuit_breaker"))?;
    if let Some(name) = &b.name {
        writeln!(f, "name = {}", string(name))?;
    }
    writeln!(
        f,
        "failure_rate_threshold = {}",
        float(b.failure_rate_threshold)
    )?;
    match b.window {
        WindowConfig::Count { size } => {
            writeln!(f, "window = {{ type = \"count\", size = {size} }}")?
        }
        WindowConfig::Time { duration, buckets } => writeln!(
            f,
            "window = {{ type = \"time\", duration = {:?}, buckets = {buckets} }}",
            d(duration)
        )?,
    }
    writeln!(f, "minimum_calls = {}", b.minimum_calls)?;
    if let Some(n) = b.consecutive_failures {
        writeln!(f, "consecutive_failures = {n}")?;
    }
    if let Some(s) = b.slow_call_duration {
        writeln!(f, "slow_call_duration = {:?}", d(s))?;
    }
    writeln!(
        f,
        "slow_call_rate_threshold = {}",
        float(b.slow_call_rate_threshold)
    )?;
    writeln!(f, "break_duration = {:?}", d(b.break_duration))?;
    if let Some(m) = b.max_break_duration {
        writeln!(f, "max_break_duration = {:?}", d(m))?;
    }
    writeln!(f, "break_multiplier = {}", float(b.break_multiplier))?;
    writeln!(f, "break_jitter = {}", float(b.break_jitter))?;
    writeln!(f, "permitted_probes = {}", b.permitted_probes)?;
    match b.max_wait_in_half_open {
        Some(w) => writeln!(f, "max_wait_in_half_open = {:?}", d(w))?,
        // Absent would load as the 60 s default.
        None => writeln!(f, "max_wait_in_half_open = \"off\"")?,
    }
    writeln!(f, "count_calls = {}", b.count_calls)?;
    writeln!(f, "count_dropped = {}", b.count_dropped)?;

    writeln!(f, "\n{}", t("breaker_keys"))?;
    writeln!(f, "max_keys = {}", c.breaker_keys.max_keys)?;
    writeln!(f, "idle_timeout = {:?}", d(c.breaker_keys.idle_timeout))?;

    writeln!(f, "\n{}", t("bulkhead"))?;
    writeln!(f, "max_concurrent = {}", c.bulkhead.max_concurrent)?;
    writeln!(f, "max_waiting = {}", c.bulkhead.max_waiting)?;
    if let Some(w) = c.bulkhead.max_wait {
        writeln!(f, "max_wait = {:?}", d(w))?;
    }

    let e = &c.enqueue;
    writeln!(f, "\n{}", t("enqueue"))?;
    writeln!(f, "enabled = {}", e.enabled)?;
    writeln!(f, "max_body = {}", e.max_body)?;
    match e.ttl {
        Some(ttl) => writeln!(f, "ttl = {:?}", d(ttl))?,
        None => writeln!(f, "ttl = \"off\"")?,
    }
    writeln!(f, "max_retry_after = {:?}", d(e.max_retry_after))?;
    writeln!(f, "sync_methods = {}", strings(&e.sync_methods))?;
    writeln!(f, "sync_routes = {}", strings(&e.sync_routes))?;

    let r = &c.replay;
    writeln!(f, "\n{}", t("replay"))?;
    writeln!(f, "concurrency = {}", r.concurrency)?;
    writeln!(f, "lease_batch = {}", r.lease_batch)?;
    writeln!(f, "lease_for = {:?}", d(r.lease_for))?;
    writeln!(f, "poll_interval = {:?}", d(r.poll_interval))?;
    writeln!(f, "max_attempts = {}", r.max_attempts)?;
    writeln!(f, "backoff_base = {:?}", d(r.backoff_base))?;
    writeln!(f, "backoff_max = {:?}", d(r.backoff_max))?;
    writeln!(f, "max_retry_after = {:?}", d(r.max_retry_after))?;
    writeln!(f, "jitter = {}", r.jitter)?;
    writeln!(f, "ack_batch = {}", r.ack_batch)?;
    writeln!(f, "ack_interval = {:?}", d(r.ack_interval))?;
    writeln!(f, "grace = {:?}", d(r.grace))?;

    let k = &c.classify;
    writeln!(f, "\n{}", t("classify"))?;
    let codes = |v: &[u16]| {
        let list: Vec<String> = v.iter().map(u16::to_string).collect();
        format!("[{}]", list.join(", "))
    };
    writeln!(f, "retryable_failure = {}", codes(&k.retryable_failure))?;
    writeln!(f, "failure = {}", codes(&k.failure))?;
    writeln!(f, "success = {}", codes(&k.success))
}

fn server(f: &mut impl Write, p: &str, s: &ServerConfig) -> fmt::Result {
    let t = |name: &str| {
        if p.is_empty() {
            format!("[{name}]")
        } else if name.is_empty() {
            format!("[{p}]")
        } else {
            format!("[{p}.{name}]")
        }
    };
    if !p.is_empty() {
        writeln!(f, "{}", t(""))?;
    }
    if let Some(preset) = &s.preset {
        writeln!(f, "preset = {}", string(preset))?;
    }
    writeln!(f, "deadline = {:?}", d(s.deadline))?;
    writeln!(f, "honour_inbound_deadline = {}", s.honour_inbound_deadline)?;
    writeln!(f, "\n{}", t("bulkhead"))?;
    writeln!(f, "max_concurrent = {}", s.bulkhead.max_concurrent)?;
    writeln!(f, "max_waiting = {}", s.bulkhead.max_waiting)?;
    if let Some(w) = s.bulkhead.max_wait {
        writeln!(f, "max_wait = {:?}", d(w))?;
    }
    let i = &s.idempotency;
    writeln!(f, "\n{}", t("idempotency"))?;
    writeln!(f, "capacity = {}", i.capacity)?;
    writeln!(f, "ttl = {:?}", d(i.ttl))?;
    writeln!(f, "lock_for = {:?}", d(i.lock_for))?;
    writeln!(f, "max_body = {}", i.max_body)?;
    if let Some(h) = &i.scope_by {
        writeln!(f, "scope_by = {}", string(h))?;
    }
    if !i.stream_through.is_empty() {
        writeln!(f, "stream_through = {}", strings(&i.stream_through))?;
    }
    writeln!(f, "require_key = {}", i.require_key)?;
    Ok(())
}

impl fmt::Display for ClientConfig {
    /// Every field, as TOML (a client section on its own, as
    /// [`ClientConfig::from_str`] reads it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        client(f, "", self)
    }
}

impl fmt::Display for ServerConfig {
    /// Every field, as TOML (a server section on its own, as
    /// [`ServerConfig::from_str`] reads it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        server(f, "", self)
    }
}

impl fmt::Display for StackConfig {
    /// The effective configuration — presets applied, defaults filled in — as TOML that
    /// [`StackConfig::from_str`] reads back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        client(f, "client", &self.client)?;
        writeln!(f)?;
        server(f, "server", &self.server)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Format;
    use super::*;

    #[test]
    fn the_rendered_config_reads_back_the_same() {
        let text = "[client]\npreset = \"standard_http_client\"\n[server]\npreset = \"server\"\n";
        let c = StackConfig::from_str(text, Format::Toml).unwrap();
        let shown = c.to_string();
        assert_eq!(
            StackConfig::from_str(&shown, Format::Toml).unwrap(),
            c,
            "{shown}"
        );

        let mut c = StackConfig::default();
        c.client.circuit_breaker.slow_call_duration = Some(std::time::Duration::from_millis(1500));
        c.client.circuit_breaker.name = Some("a \"quoted\" name".into());
        c.client.bulkhead.max_wait = Some(std::time::Duration::from_millis(20));
        c.client.bulkhead.max_waiting = 4;
        c.client.retry.max_open_wait = Some(std::time::Duration::from_millis(250));
        c.client.replay.concurrency = 3;
        c.client.replay.backoff_max = std::time::Duration::from_secs(90);
        c.client.classify.retryable_failure = vec![409, 425];
        c.client.classify.success = vec![404];
        c.client.enqueue.ttl = None;
        let shown = c.to_string();
        assert_eq!(
            StackConfig::from_str(&shown, Format::Toml).unwrap(),
            c,
            "{shown}"
        );
        let alone = c.client.to_string();
        assert_eq!(
            ClientConfig::from_str(&alone, Format::Toml).unwrap(),
            c.client
        );
        let alone = c.server.to_string();
        assert_eq!(
            ServerConfig::from_str(&alone, Format::Toml).unwrap(),
            c.server
        );
    }

    /// Extreme values render to text that loads back: a `Duration::MAX` ttl ("keep
    /// it") was written as `18446744073709552000s`, which the loader refused, and a
    /// duration with nanoseconds lost them through a float.
    #[test]
    fn extreme_values_round_trip() {
        let mut c = StackConfig::default();
        c.server.idempotency.ttl = std::time::Duration::MAX;
        c.server.idempotency.lock_for = std::time::Duration::new(3600, 1);
        let shown = c.to_string();
        let back = StackConfig::from_str(&shown, Format::Toml).unwrap();
        assert_eq!(back, c, "{shown}");
    }

    /// A breaker whose half-open limit is off renders as `"off"` and loads back off
    /// (it was left out, and so loaded as the 60 s default).
    #[test]
    fn a_half_open_limit_switched_off_round_trips() {
        let mut c = StackConfig::default();
        c.client.circuit_breaker.max_wait_in_half_open = None;
        let shown = c.to_string();
        let back = StackConfig::from_str(&shown, Format::Toml).unwrap();
        assert_eq!(back, c, "{shown}");
        assert!(back.client.circuit_breaker.builder().build().is_ok());
        // `null` is off too (YAML `~`, JSON `null`).
        for (text, format) in [
            (
                r#"{"client": {"circuit_breaker": {"max_wait_in_half_open": null}}}"#,
                Format::Json,
            ),
            (
                "client:\n  circuit_breaker:\n    max_wait_in_half_open: ~\n",
                Format::Yaml,
            ),
        ] {
            let c = StackConfig::from_str(text, format).unwrap();
            assert_eq!(
                c.client.circuit_breaker.max_wait_in_half_open, None,
                "{text}"
            );
        }
    }

    /// Strings with characters Rust's `{:?}` escapes in a way TOML does not read (a
    /// NUL, DEL, a soft hyphen) round trip.
    #[test]
    fn strings_with_control_characters_round_trip() {
        let mut c = StackConfig::default();
        c.client.circuit_breaker.name = Some("a\u{0}\u{7f}\u{ad}\"\\b\n\t".to_owned());
        c.client.enqueue.sync_routes = vec!["/caf\u{e9}/\u{1b}".to_owned()];
        c.server.idempotency.scope_by = Some("authorization".to_owned());
        c.server.idempotency.stream_through = vec!["/chat.Chat/*".to_owned()];
        c.client.stream_through = vec!["/chat.Chat/Talk".to_owned()];
        let shown = c.to_string();
        let back = StackConfig::from_str(&shown, Format::Toml).unwrap();
        assert_eq!(back, c, "{shown}");
    }

    /// A count over a config file's largest integer is an error naming it: it could not
    /// be written and read back.
    #[test]
    fn a_count_over_a_files_largest_integer_is_an_error() {
        let mut c = StackConfig::default();
        c.client.bulkhead.max_waiting = usize::MAX;
        assert_eq!(
            c.validate().unwrap_err().field(),
            "client.bulkhead.max_waiting"
        );
        c.client.bulkhead.max_waiting = i64::MAX as usize;
        c.client.bulkhead.max_wait = Some(std::time::Duration::from_secs(1));
        c.validate().unwrap();
        let back = StackConfig::from_str(&c.to_string(), Format::Toml).unwrap();
        assert_eq!(back, c);
    }

    /// A NaN set in code (where it is not used, so no layer checks it) is refused by
    /// validation, naming the field: it cannot be rendered and read back.
    #[test]
    fn a_nan_is_a_config_error() {
        let mut c = StackConfig::default();
        c.client.retry.backoff.kind = BackoffKind::Constant;
        c.client.retry.backoff.factor = f64::NAN;
        assert_eq!(
            c.validate().unwrap_err().field(),
            "client.retry.backoff.factor"
        );
        assert!(c.to_string().contains("factor = nan"));
    }
}
