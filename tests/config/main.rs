//! Config files: presets and overrides, the three formats, and errors that say where.

use bytes::Bytes;
use http_body_util::Full;
use postbox::BoxError;
use postbox::circuit_breaker::WindowConfig;
use postbox::config::{ClientConfig, Format, ServerConfig, StackConfig};
use postbox::http::body::ReplayBody;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::{ServiceBuilder, ServiceExt, service_fn};

const TOML: &str = r#"
[client]
preset = "standard_http_client"
deadline = "3s"
attempt_timeout = "500ms"

[client.retry]
max_retries = 2

[client.retry.backoff]
max_delay = "1s"

[client.circuit_breaker]
window = { type = "count", size = 50 }

[server]
preset = "server"

[server.bulkhead]
max_concurrent = 64
"#;

const YAML: &str = r#"
client:
  preset: standard_http_client
  deadline: 3s
  attempt_timeout: 500ms
  retry:
    max_retries: 2
    backoff:
      max_delay: 1s
  circuit_breaker:
    window:
      type: count
      size: 50
server:
  preset: server
  bulkhead:
    max_concurrent: 64
"#;

const JSON: &str = r#"{
  "client": {
    "preset": "standard_http_client",
    "deadline": "3s",
    "attempt_timeout": "500ms",
    "retry": { "max_retries": 2, "backoff": { "max_delay": "1s" } },
    "circuit_breaker": { "window": { "type": "count", "size": 50 } }
  },
  "server": { "preset": "server", "bulkhead": { "max_concurrent": 64 } }
}"#;

#[test]
fn presets_load_and_overrides_apply() {
    let c = StackConfig::from_str(TOML, Format::Toml).unwrap();
    // Overrides.
    assert_eq!(c.client.deadline, Duration::from_secs(3));
    assert_eq!(c.client.attempt_timeout, Duration::from_millis(500));
    assert_eq!(c.client.retry.max_retries, 2);
    assert_eq!(c.client.retry.backoff.max_delay, Duration::from_secs(1));
    assert_eq!(
        c.client.circuit_breaker.window,
        WindowConfig::Count { size: 50 }
    );
    assert_eq!(c.server.bulkhead.max_concurrent, 64);
    // Kept from the presets (merged field by field), in a table the document
    // overrides: values the preset sets apart from the built-in defaults, so a preset
    // ignored, or a table that replaced the preset's whole, fails here. (The rest of
    // the presets' values below are the defaults too.)
    let defaults = ClientConfig::default();
    assert_eq!(c.client.retry.max_retry_after, Duration::from_secs(5));
    assert_ne!(defaults.retry.max_retry_after, Duration::from_secs(5));
    let preset = ClientConfig::standard_http_client();
    assert_eq!(c.client.retry.backoff.base, preset.retry.backoff.base);
    assert_eq!(c.client.retry.budget, preset.retry.budget);
    assert_eq!(c.client.bulkhead, preset.bulkhead);
    assert_eq!(c.client.preset.as_deref(), Some("standard_http_client"));
    assert_eq!(c.server.idempotency, ServerConfig::server().idempotency);
    assert_eq!(c.server.deadline, ServerConfig::server().deadline);
    c.client.layer().unwrap();
    c.server.layer().unwrap();
}

#[test]
fn toml_yaml_and_json_give_the_same_config() {
    let toml = StackConfig::from_str(TOML, Format::Toml).unwrap();
    let yaml = StackConfig::from_str(YAML, Format::Yaml).unwrap();
    let json = StackConfig::from_str(JSON, Format::Json).unwrap();
    assert_eq!(toml, yaml);
    assert_eq!(toml, json);
}

#[test]
fn an_empty_file_is_the_defaults() {
    for (text, format) in [("", Format::Toml), ("", Format::Yaml), ("{}", Format::Json)] {
        assert_eq!(
            StackConfig::from_str(text, format).unwrap(),
            StackConfig::default()
        );
    }
}

/// A YAML section with no value (`client:` with nothing under it, every line
/// commented out) is an empty section: its defaults, or its preset's
/// table unchanged. It failed with "invalid type: null" (after a preset it did not
/// have), or replaced the preset's whole table.
#[test]
fn an_empty_yaml_section_reads_as_its_defaults() {
    let c = StackConfig::from_str("client:\nserver:\n", Format::Yaml).unwrap();
    assert_eq!(c, StackConfig::default());
    let c = StackConfig::from_str("client:\nserver:\n  bulkhead:\n", Format::Yaml).unwrap();
    assert_eq!(c, StackConfig::default());
    let c = ClientConfig::from_str(
        "preset: standard_http_client\nretry:\ncircuit_breaker:\n",
        Format::Yaml,
    )
    .unwrap();
    assert_eq!(c, ClientConfig::standard_http_client());
    let c = ClientConfig::from_str("preset:\nretry:\n", Format::Yaml).unwrap();
    assert_eq!(c, ClientConfig::default());
}

#[test]
fn a_wrong_unit_names_the_value_field_and_line() {
    let toml = "[client]\ndeadline = \"3s\"\nattempt_timeout = \"250 parsecs\"\n";
    let yaml = "client:\n  deadline: 3s\n  attempt_timeout: 250 parsecs\n";
    let json = "{\n  \"client\": {\n    \"deadline\": \"3s\",\n    \"attempt_timeout\": \"250 parsecs\"\n  }\n}";
    for (text, format, line) in [
        (toml, Format::Toml, 3),
        (yaml, Format::Yaml, 3),
        (json, Format::Json, 4),
    ] {
        let e = StackConfig::from_str(text, format).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("unknown unit `parsecs`"),
            "{format}: {shown}"
        );
        assert!(shown.contains("250 parsecs"), "{format}: {shown}");
        assert_eq!(e.line(), Some(line), "{format}: {shown}");
        assert_eq!(e.field(), Some("attempt_timeout"), "{format}: {shown}");
        assert!(shown.contains(&format!("line {line}")), "{format}: {shown}");
    }
}

#[test]
fn a_bad_duration_is_located_at_its_own_field_not_at_an_earlier_lookalike() {
    // `500` is also the start of the valid `500ms` on the line before.
    let toml = "[client]\nattempt_timeout = \"500ms\"\ndeadline = \"500\"\n";
    let yaml = "client:\n  attempt_timeout: 500ms\n  deadline: 500\n";
    let json = "{\n  \"client\": {\n    \"attempt_timeout\": \"500ms\",\n    \"deadline\": \"500\"\n  }\n}";
    for (text, format, line) in [
        (toml, Format::Toml, 3),
        (yaml, Format::Yaml, 3),
        (json, Format::Json, 4),
    ] {
        let e = StackConfig::from_str(text, format).unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("missing unit"), "{format}: {shown}");
        assert_eq!(e.line(), Some(line), "{format}: {shown}");
        assert_eq!(e.field(), Some("deadline"), "{format}: {shown}");
    }
}

/// A bad duration that looks like another field's number (`max_retries: 2` before
/// `deadline: 2`, `minimum_calls = 10` before `break_duration = "10"` in one inline
/// table) is located at its own field: the first lookalike was taken, named, and its
/// line given.
#[test]
fn a_bad_duration_is_located_at_its_own_field_not_at_another_fields_number() {
    for (text, format, field, line) in [
        (
            "client:\n  retry:\n    max_retries: 2\n  deadline: 2\n",
            Format::Yaml,
            "deadline",
            4,
        ),
        (
            "[client]\ncircuit_breaker = { minimum_calls = 10, break_duration = \"10\" }\n",
            Format::Toml,
            "break_duration",
            2,
        ),
        (
            r#"{"client":{"circuit_breaker":{"minimum_calls": 10, "break_duration": "10"}}}"#,
            Format::Json,
            "break_duration",
            1,
        ),
        (
            "{\n  \"client\": {\n    \"deadline\": \"2\",\n    \"retry\": {\"max_retries\": 2}\n  }\n}",
            Format::Json,
            "deadline",
            3,
        ),
    ] {
        let e = StackConfig::from_str(text, format).unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("missing unit"), "{format}: {shown}");
        assert_eq!(
            (e.field(), e.line()),
            (Some(field), Some(line)),
            "{format}: {shown}"
        );
    }
    // The column too, inside the inline table.
    let e = StackConfig::from_str(
        "[client]\ncircuit_breaker = { minimum_calls = 10, break_duration = \"10\" }\n",
        Format::Toml,
    )
    .unwrap_err();
    assert_eq!(e.column(), Some(59), "{e}");
}

#[test]
fn a_server_bulkhead_table_without_max_concurrent_keeps_the_server_default() {
    let toml = "[server]\ndeadline = \"5s\"\n[server.bulkhead]\nmax_waiting = 0\n";
    let yaml = "server:\n  deadline: 5s\n  bulkhead:\n    max_waiting: 0\n";
    let json = "{\"server\": {\"deadline\": \"5s\", \"bulkhead\": {\"max_waiting\": 0}}}";
    for (text, format) in [
        (toml, Format::Toml),
        (yaml, Format::Yaml),
        (json, Format::Json),
    ] {
        let c = StackConfig::from_str(text, format).unwrap();
        assert_eq!(
            c.server.bulkhead,
            ServerConfig::default().bulkhead,
            "{format}"
        );
        assert_eq!(c.server.bulkhead.max_concurrent, 256, "{format}");
    }
    // A value given is kept, and a field the table does not know is still an error.
    let c = ServerConfig::from_str("[bulkhead]\nmax_concurrent = 7\n", Format::Toml).unwrap();
    assert_eq!(c.bulkhead.max_concurrent, 7);
    let e = ServerConfig::from_str("[bulkhead]\nmax_concurent = 7\n", Format::Toml).unwrap_err();
    assert!(e.is_unknown_field(), "{e}");
    assert_eq!(
        (e.field(), e.line()),
        (Some("max_concurent"), Some(2)),
        "{e}"
    );
}

#[test]
fn an_unknown_field_names_the_field_and_line() {
    let toml = "[client]\ndeadline = \"3s\"\n\n[client.retry]\nmax_retry = 2\n";
    let yaml = "client:\n  deadline: 3s\n  retry:\n    max_retry: 2\n";
    let json = "{\n  \"client\": {\n    \"retry\": {\n      \"max_retry\": 2\n    }\n  }\n}";
    for (text, format, line) in [
        (toml, Format::Toml, 5),
        (yaml, Format::Yaml, 4),
        (json, Format::Json, 4),
    ] {
        let e = StackConfig::from_str(text, format).unwrap_err();
        let shown = e.to_string();
        assert!(e.is_unknown_field(), "{format}: {shown}");
        assert_eq!(e.field(), Some("max_retry"), "{format}: {shown}");
        assert_eq!(e.line(), Some(line), "{format}: {shown}");
        assert!(
            shown.contains("unknown field `max_retry`"),
            "{format}: {shown}"
        );
        assert!(shown.contains(&format!("line {line}")), "{format}: {shown}");
    }
}

/// An empty field name is an unknown field like any other; locating it once looped
/// for ever. Run on a thread so a regression fails instead of hanging the suite.
#[test]
fn an_empty_field_name_is_an_error_not_a_hang() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let texts = [
            (r#"{"": 1}"#, Format::Json),
            ("{\n  \"client\": {\"\": 1}\n}", Format::Json),
            ("client = { \"\" = 1 }\n", Format::Toml),
            ("client:\n  \"\": 1\n", Format::Yaml),
        ];
        for (text, format) in texts {
            let e = StackConfig::from_str(text, format).unwrap_err();
            tx.send((format, e.is_unknown_field(), e.to_string()))
                .unwrap();
        }
    });
    for _ in 0..4 {
        let (format, unknown, shown) = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the config loader hangs on an empty field name");
        assert!(unknown, "{format}: {shown}");
    }
}

#[test]
fn a_field_inside_the_breaker_window_is_located_too() {
    let toml = "[client.circuit_breaker]\nwindow = { type = \"time\", duration = \"9 parsecs\", buckets = 1 }\n";
    let yaml = "client:\n  circuit_breaker:\n    window:\n      type: time\n      duration: 1s\n      buckets: 1\n      extra: 3\n";
    let e = StackConfig::from_str(toml, Format::Toml).unwrap_err();
    assert_eq!((e.field(), e.line()), (Some("duration"), Some(2)), "{e}");
    assert!(e.to_string().contains("unknown unit `parsecs`"), "{e}");
    let e = StackConfig::from_str(yaml, Format::Yaml).unwrap_err();
    assert_eq!((e.field(), e.line()), (Some("extra"), Some(7)), "{e}");
}

#[test]
fn cross_layer_violations_name_the_fields() {
    // attempt timeout above the deadline
    let e = StackConfig::from_str(
        "[client]\ndeadline = \"1s\"\nattempt_timeout = \"2s\"\n",
        Format::Toml,
    )
    .unwrap_err();
    assert_eq!(e.field(), Some("client.attempt_timeout"));
    assert_eq!(e.line(), Some(3));
    assert!(e.to_string().contains("client.deadline"), "{e}");
    assert!(e.config_error().is_some());

    // breaker time window shorter than two attempts
    let e = StackConfig::from_str(
        r#"
[client]
preset = "standard_http_client"
attempt_timeout = "2s"

[client.circuit_breaker]
window = { type = "time", duration = "3s", buckets = 3 }
"#,
        Format::Toml,
    )
    .unwrap_err();
    assert_eq!(e.field(), Some("client.circuit_breaker.window.duration"));
    assert_eq!(e.line(), Some(7));
    assert!(
        e.to_string().contains("2 × `client.attempt_timeout`"),
        "{e}"
    );

    // The backoff's waits beyond the deadline: eight retries (100 ms doubling to a 2 s
    // cap: 9.1 s in all) fit in 10 s, ten (13.1 s) do not.
    StackConfig::from_str(
        "client:\n  preset: standard_http_client\n  retry:\n    max_retries: 8\n",
        Format::Yaml,
    )
    .unwrap();
    let e = StackConfig::from_str(
        "client:\n  preset: standard_http_client\n  retry:\n    max_retries: 10\n",
        Format::Yaml,
    )
    .unwrap_err();
    assert_eq!(e.field(), Some("client.retry.backoff.max_delay"));
    let shown = e.to_string();
    assert!(shown.contains("`client.retry.max_retries` (10)"), "{shown}");
    assert!(
        shown.contains("more than `client.deadline` (10s)"),
        "{shown}"
    );

    // server: claim shorter than the deadline
    let e = StackConfig::from_str(
        r#"{"server": {"preset": "server", "idempotency": {"lock_for": "1s"}}}"#,
        Format::Json,
    )
    .unwrap_err();
    assert_eq!(e.field(), Some("server.idempotency.lock_for"));

    // a client bulkhead whose wait is unbounded, or outlasts the deadline: it waits
    // before the deadline's timer starts
    for wait in ["", "max_wait = \"60s\"\n"] {
        let text = format!(
            "[client]\npreset = \"standard_http_client\"\n[client.bulkhead]\nmax_waiting = 10\n{wait}"
        );
        let e = StackConfig::from_str(&text, Format::Toml).unwrap_err();
        assert_eq!(e.field(), Some("client.bulkhead.max_wait"), "{e}");
    }
    let ok = "[client]\npreset = \"standard_http_client\"\n[client.bulkhead]\nmax_waiting = 10\nmax_wait = \"1s\"\n";
    StackConfig::from_str(ok, Format::Toml).unwrap();

    // a server bulkhead that lets callers wait is refused at `max_waiting` (it was
    // reported at `max_wait`, and setting that brought the next error)
    let e =
        StackConfig::from_str("[server.bulkhead]\nmax_waiting = 10\n", Format::Toml).unwrap_err();
    assert_eq!(e.field(), Some("server.bulkhead.max_waiting"), "{e}");
    assert_eq!(e.line(), Some(2), "{e}");

    // deferred requests that expire within the deadline: a call that fails at its
    // deadline could never be deferred
    let ttl = |ttl: &str| {
        format!("[client]\ndeadline = \"10s\"\n[client.enqueue]\nenabled = true\nttl = \"{ttl}\"\n")
    };
    let e = StackConfig::from_str(&ttl("5s"), Format::Toml).unwrap_err();
    assert_eq!(e.field(), Some("client.enqueue.ttl"), "{e}");
    assert_eq!(e.line(), Some(5), "{e}");
    assert!(e.to_string().contains("`client.deadline` (10s)"), "{e}");
    StackConfig::from_str(&ttl("1m"), Format::Toml).unwrap();
    StackConfig::from_str(&ttl("off"), Format::Toml).unwrap();
}

/// A replayer count too large for a config file (TOML integers are 64-bit signed) is
/// an error, even with the fallback off: it loaded from JSON, and the file `render`
/// wrote from it did not load back.
#[test]
fn a_replay_count_over_a_files_largest_integer_is_an_error() {
    for field in ["concurrency", "lease_batch", "ack_batch"] {
        let text = format!(r#"{{"client": {{"replay": {{"{field}": 18446744073709551615}}}}}}"#);
        let e = StackConfig::from_str(&text, Format::Json).unwrap_err();
        assert_eq!(
            e.field().map(str::to_owned),
            Some(format!("client.replay.{field}")),
            "{e}"
        );
    }
}

/// Methods are case-sensitive: `"get"` would keep no `GET` synchronous, so every GET
/// would become deferrable. Refused, with the upper-case spelling suggested.
#[test]
fn a_lower_case_sync_method_is_an_error() {
    let e = StackConfig::from_str(
        "[client.enqueue]\nenabled = true\nsync_methods = [\"get\"]\n",
        Format::Toml,
    )
    .unwrap_err();
    assert_eq!(e.field(), Some("client.enqueue.sync_methods"));
    assert!(e.to_string().contains("\"GET\""), "{e}");
}

/// Any upper-case method token is a method (`M_SEARCH`, `PURGE2`): they were refused as
/// "not upper-case", with the same spelling suggested. What is no method at all (a
/// space, an empty name) is refused as such.
#[test]
fn an_upper_case_method_token_is_a_sync_method() {
    let c = StackConfig::from_str(
        "[client.enqueue]\nsync_methods = [\"M_SEARCH\", \"PURGE2\", \"M-SEARCH\"]\n",
        Format::Toml,
    )
    .unwrap();
    assert_eq!(
        c.client.enqueue.sync_methods,
        ["M_SEARCH", "PURGE2", "M-SEARCH"]
    );
    for bad in ["", "GET POST"] {
        let e = StackConfig::from_str(
            &format!("[client.enqueue]\nsync_methods = [{bad:?}]\n"),
            Format::Toml,
        )
        .unwrap_err();
        assert_eq!(e.field(), Some("client.enqueue.sync_methods"), "{e}");
        assert!(e.to_string().contains("not an HTTP method"), "{e}");
    }
}

/// A preset's breaker window can be changed one field at a time, as every other table:
/// `[client.circuit_breaker.window] duration = "60s"` keeps the preset's `type` and
/// `buckets` (it failed with "missing field `type`").
#[test]
fn a_preset_window_field_can_be_overridden_alone() {
    let c = StackConfig::from_str(
        "[client]\npreset = \"standard_http_client\"\n[client.circuit_breaker.window]\nduration = \"60s\"\n",
        Format::Toml,
    )
    .unwrap();
    let preset = ClientConfig::standard_http_client();
    assert_ne!(
        c.client.circuit_breaker.window,
        preset.circuit_breaker.window
    );
    let mut expected = preset;
    if let WindowConfig::Time { duration, .. } = &mut expected.circuit_breaker.window {
        *duration = Duration::from_secs(60);
    } else {
        panic!("the preset's window is a time window");
    }
    assert_eq!(
        c.client.circuit_breaker.window,
        expected.circuit_breaker.window
    );
    // A partial window does not hide another mistake in the file.
    let e = StackConfig::from_str(
        "[client]\npreset = \"standard_http_client\"\n[client.circuit_breaker.window]\nduration = \"60s\"\n[client.retry]\nmax_retriez = 2\n",
        Format::Toml,
    )
    .unwrap_err();
    assert!(e.to_string().contains("max_retriez"), "{e}");
    assert_eq!(e.line(), Some(6), "{e}");
    // Any other mistake under a preset is reported by the strict parse, with its line.
    let e = StackConfig::from_str(
        "[client]\npreset = \"standard_http_client\"\n[client.retry]\nmax_retries = \"two\"\n",
        Format::Toml,
    )
    .unwrap_err();
    assert_eq!(e.line(), Some(4), "{e}");
    // Without a preset, the window still needs its `type`, with the line.
    let e = StackConfig::from_str(
        "[client.circuit_breaker.window]\nduration = \"60s\"\n",
        Format::Toml,
    )
    .unwrap_err();
    assert!(e.to_string().contains("type"), "{e}");
}

#[test]
fn a_layer_error_is_named_with_its_section() {
    let e =
        StackConfig::from_str("[server.bulkhead]\nmax_concurrent = 0\n", Format::Toml).unwrap_err();
    assert_eq!(e.field(), Some("server.bulkhead.max_concurrent"));
    assert_eq!(e.line(), Some(2));
}

/// A syntax or type error on a line with a non-ASCII character before the key is an
/// error, not a panic (the key was cut out of the line at a byte inside a character).
#[test]
fn a_bad_line_with_non_ascii_text_is_an_error_not_a_panic() {
    for (text, format) in [
        ("[client]\n\"größe\" = 5s\n", Format::Toml),
        ("[client]\né=1\ndeadline = 5s\n", Format::Toml),
        (
            r#"{"client":{"enqueue":{"sync_routes":["/café:menu", 1]}}}"#,
            Format::Json,
        ),
    ] {
        assert!(StackConfig::from_str(text, format).is_err(), "{text}");
    }
}

/// A NaN or an infinity in a file is named like in code, not "invalid type: null".
#[test]
fn a_non_finite_number_in_a_file_names_its_field() {
    for (text, format) in [
        ("[client.retry.backoff]\nfactor = nan\n", Format::Toml),
        (
            "[client.circuit_breaker]\nbreak_jitter = inf\n",
            Format::Toml,
        ),
        (
            "client:\n  retry:\n    backoff:\n      factor: .nan\n",
            Format::Yaml,
        ),
    ] {
        let e = StackConfig::from_str(text, format).unwrap_err();
        assert!(e.to_string().contains("finite"), "{format}: {e}");
        assert!(
            e.field().is_some_and(|f| f.starts_with("client.")),
            "{format}: {e}"
        );
    }
}

/// A NaN beside a partial override of a preset's table (no typed parse to name it:
/// that one misses the table's `type`) names its field and line; a YAML list whose items
/// are all commented out is the empty list the typed parse reads, or, under a preset,
/// an error naming its field and line. (Both failed as "after applying the preset: invalid type: null", no field,
/// no line, the second with no preset in the file.)
#[test]
fn a_null_in_the_value_tree_names_its_field_or_reads_as_the_typed_parse_does() {
    let text = "[client]\npreset = \"standard_http_client\"\n[client.circuit_breaker.window]\nduration = \"60s\"\n[client.retry.backoff]\nfactor = nan\n";
    let e = StackConfig::from_str(text, Format::Toml).unwrap_err();
    assert!(e.to_string().contains("finite"), "{e}");
    assert_eq!(
        (e.field(), e.line()),
        (Some("client.retry.backoff.factor"), Some(6)),
        "{e}"
    );

    let yaml = "client:\n  enqueue:\n    sync_methods:\n    #  - GET\n";
    let c = StackConfig::from_str(yaml, Format::Yaml).unwrap();
    assert!(c.client.enqueue.sync_methods.is_empty());
    let with_preset = format!(
        "client:\n  preset: standard_http_client\n{}",
        &yaml["client:\n".len()..]
    );
    // With a preset the tree's `null` replaces the preset's list: an error, located.
    let e = StackConfig::from_str(&with_preset, Format::Yaml).unwrap_err();
    assert_eq!(
        (e.field(), e.line()),
        (Some("client.enqueue.sync_methods"), Some(4)),
        "{e}"
    );

    // A breaker `window:` with nothing under it keeps the preset's window, as an empty
    // `retry:` keeps the preset's retry (its typed parse refused the empty value).
    let yaml = "client:
  preset: standard_http_client
  circuit_breaker:
    window:
    #  type: count
";
    let c = StackConfig::from_str(yaml, Format::Yaml).unwrap();
    assert_eq!(
        c.client.circuit_breaker.window,
        ClientConfig::standard_http_client().circuit_breaker.window
    );
    // Without a preset to take it from, the window is missing its fields: an error.
    let yaml = "client:
  circuit_breaker:
    window:
";
    assert!(StackConfig::from_str(yaml, Format::Yaml).is_err());
}

/// `scope_by` must name a header: a bad one is an error naming the field, a good one
/// scopes the server stack's keys by caller.
#[tokio::test]
async fn idempotency_scope_by_is_checked_and_applied() {
    let e = StackConfig::from_str("[server.idempotency]\nscope_by = \"a b\"\n", Format::Toml)
        .unwrap_err();
    assert_eq!(e.field(), Some("server.idempotency.scope_by"));
    assert_eq!(e.line(), Some(2));
    let config = ServerConfig::from_str(
        "[idempotency]\nscope_by = \"Authorization\"\n",
        Format::Toml,
    )
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = tower::Layer::layer(
        &config.layer().unwrap(),
        service_fn({
            let calls = calls.clone();
            move |_req: http::Request<_>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
                }
            }
        }),
    );
    let mut replayed = Vec::new();
    for token in ["alice", "bob", "alice"] {
        let req = http::Request::post("http://shop.test/orders")
            .header("idempotency-key", "order-7")
            .header("authorization", token)
            .body(Full::new(Bytes::from("{}")))
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        replayed.push(res.headers().contains_key("idempotent-replayed"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "bob got alice's answer");
    // Alice's repeat is still answered from the store: scoped, not switched off.
    assert_eq!(replayed, [false, false, true]);
}

/// In the server stack a duplicate of a request still running is answered `409` with
/// `Retry-After` before its own deadline passes: the idempotency layer ends its wait
/// just before the deadline. (The deadline answered first, `504`, and the `409` the
/// layer documents was never seen behind it.)
#[tokio::test(start_paused = true)]
async fn a_duplicate_in_the_server_stack_gets_409_before_its_deadline() {
    let config = ServerConfig::from_str("deadline = \"2s\"\n", Format::Toml).unwrap();
    let svc = tower::Layer::layer(
        &config.layer().unwrap(),
        service_fn(|_req: http::Request<_>| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
        }),
    );
    let call = || {
        http::Request::post("http://shop.test/orders")
            .header("idempotency-key", "k")
            .body(Full::new(Bytes::from("{}")))
            .unwrap()
    };
    let first = tokio::spawn(svc.clone().oneshot(call()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = tokio::time::Instant::now();
    let dup = svc.oneshot(call()).await.unwrap();
    assert_eq!(dup.status(), http::StatusCode::CONFLICT);
    assert!(dup.headers().contains_key(http::header::RETRY_AFTER));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() > Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), http::StatusCode::GATEWAY_TIMEOUT);
}

/// A `stream_through` pattern that would match every call (silently switching the
/// idempotency layer off) or none (silently doing nothing) is an error naming the entry.
#[test]
fn idempotency_stream_through_patterns_that_match_all_or_nothing_are_errors() {
    for (bad, why) in [
        ("*", "every call"),
        ("/*", "every call"),
        ("", "no call"),
        ("/", "no call"),
        ("/chat.Chat", "no call"),
        ("/chat.Chat/", "no call"),
        ("/api/chat.Chat/Talk", "no call"),
        ("*/*", "no call"),
        ("/chat.*/Talk", "no call"),
        ("/chat.Chat/**", "no call"),
        ("//*", "method alone"),
        ("//Talk", "method alone"),
    ] {
        let toml = format!("[server.idempotency]\nstream_through = [\"/ok.Ok/*\", {bad:?}]\n");
        let e = StackConfig::from_str(&toml, Format::Toml).unwrap_err();
        assert_eq!(
            e.field(),
            Some("server.idempotency.stream_through[1]"),
            "{bad:?}: {e}"
        );
        assert_eq!(e.line(), Some(2), "{bad:?}: {e}");
        assert!(e.to_string().contains(why), "{bad:?}: {e}");
    }
    for good in [
        "/chat.Chat/Talk",
        "chat.Chat/*",
        "/chat.Ch*",
        "/chat.Chat/Ta*",
    ] {
        let toml = format!("[idempotency]\nstream_through = [{good:?}]\n");
        ServerConfig::from_str(&toml, Format::Toml).unwrap_or_else(|e| panic!("{good:?}: {e}"));
    }
}

/// The layers' own `stream_through` refuse the same patterns at build time (the
/// config file was checked; code was not): a pattern naming no method, or three
/// segments, left a client stream buffered until its deadline.
#[test]
fn the_layers_stream_through_refuse_patterns_that_match_all_or_nothing() {
    use postbox::http::body::BufferBodyLayer;
    use postbox::idempotency::IdempotencyLayer;
    for bad in ["*", "/api/chat.Chat/Talk", "//*", "/chat.Chat"] {
        let e = BufferBodyLayer::new(1024).stream_through(bad).unwrap_err();
        assert_eq!(e.field(), "buffer_body.stream_through", "{bad:?}");
        #[cfg(feature = "grpc")]
        {
            let e = postbox::grpc::GrpcStatusLayer::new()
                .stream_through(bad)
                .unwrap_err();
            assert_eq!(e.field(), "grpc_status.stream_through", "{bad:?}");
        }
        let e = IdempotencyLayer::new(10).stream_through(bad).unwrap_err();
        assert_eq!(e.field(), "idempotency.stream_through", "{bad:?}");
    }
    BufferBodyLayer::new(1024)
        .stream_through("/chat.Chat/Talk")
        .and_then(|l| l.stream_through("/chat.Chat/*"))
        .unwrap();
}

/// `stream_through` names gRPC methods whose calls the server stack's idempotency
/// layer passes through as if they had no key: never replayed.
#[tokio::test(start_paused = true)]
async fn idempotency_stream_through_is_applied() {
    let config = ServerConfig::from_str(
        "[idempotency]\nstream_through = [\"/chat.Chat/*\"]\n",
        Format::Toml,
    )
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = tower::Layer::layer(
        &config.layer().unwrap(),
        service_fn({
            let calls = calls.clone();
            move |_req: http::Request<_>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
                }
            }
        }),
    );
    for path in [
        "/chat.Chat/Talk",
        "/chat.Chat/Talk",
        "/shop.Orders/Place",
        "/shop.Orders/Place",
    ] {
        let req = http::Request::post(format!("http://shop.test{path}"))
            .header("idempotency-key", "k")
            .body(Full::new(Bytes::from("{}")))
            .unwrap();
        svc.clone().oneshot(req).await.unwrap();
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the named method runs each time, the other once"
    );
}

/// `honour_inbound_deadline = false`: the handler sees the server's own budget, not
/// the `postbox-timeout-ms: 0` a remote client sent. (Paused time: the whole budget.)
#[tokio::test(start_paused = true)]
async fn a_server_not_honouring_inbound_deadlines_keeps_its_budget() {
    let config = ServerConfig::from_str(
        "honour_inbound_deadline = false\ndeadline = \"4s\"\n",
        Format::Toml,
    )
    .unwrap();
    let svc = tower::Layer::layer(
        &config.layer().unwrap(),
        service_fn(|req: http::Request<_>| async move {
            let got = req.headers()[postbox::timeout::TIMEOUT_MS_HEADER].clone();
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                got.as_bytes().to_vec(),
            ))))
        }),
    );
    let req = http::Request::post("http://shop.test/orders")
        .header(postbox::timeout::TIMEOUT_MS_HEADER, "0")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    let ms: u64 = std::str::from_utf8(&body).unwrap().parse().unwrap();
    assert_eq!(ms, 4000, "the handler saw {ms} ms");
}

/// An idempotency capacity of 0 is an error, not silently one key.
#[test]
fn an_idempotency_capacity_of_zero_is_an_error() {
    let e =
        StackConfig::from_str("[server.idempotency]\ncapacity = 0\n", Format::Toml).unwrap_err();
    assert_eq!(e.field(), Some("server.idempotency.capacity"));
    assert_eq!(e.line(), Some(2));
}

#[test]
fn an_unknown_preset_is_an_error() {
    let e = StackConfig::from_str("[client]\npreset = \"server\"\n", Format::Toml).unwrap_err();
    assert_eq!(e.field(), Some("client.preset"));
    assert_eq!(e.line(), Some(2));
    assert!(e.to_string().contains("standard_http_client"), "{e}");
}

#[test]
fn a_section_alone_and_a_file_on_disk() {
    let c = ClientConfig::from_str("preset = \"standard_http_client\"\n", Format::Toml).unwrap();
    assert_eq!(c, ClientConfig::standard_http_client());
    let e = ClientConfig::from_str("deadline = \"1s\"\nattempt_timeout = \"2s\"", Format::Toml)
        .unwrap_err();
    assert_eq!(e.field(), Some("attempt_timeout"));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stack.yaml");
    std::fs::write(&path, YAML).unwrap();
    assert_eq!(
        StackConfig::load(&path).unwrap(),
        StackConfig::from_str(TOML, Format::Toml).unwrap()
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"client\": {\"deadline\": \"2 fortnights\"}}").unwrap();
    let e = StackConfig::load(&bad).unwrap_err();
    assert_eq!(e.path(), Some(bad.as_path()));
    assert!(e.to_string().starts_with(&bad.display().to_string()), "{e}");
    // A file of an unknown kind is refused for its extension, not read as YAML.
    let ini = dir.path().join("stack.ini");
    std::fs::write(&ini, YAML).unwrap();
    let e = StackConfig::load(&ini).unwrap_err();
    assert!(e.format().is_none(), "{e}");
    assert!(e.message().contains("unknown config format"), "{e}");
    assert_eq!(e.path(), Some(ini.as_path()));
    let missing = StackConfig::load(dir.path().join("missing.yaml")).unwrap_err();
    assert!(
        !missing.message().contains("unknown config format"),
        "{missing}"
    );
}

#[test]
fn the_example_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let loaded = StackConfig::load(&path);
        if name.starts_with("bad") {
            assert!(loaded.is_err(), "{name} should be refused");
        } else {
            loaded.unwrap_or_else(|e| panic!("{e}"));
        }
        n += 1;
    }
    assert!(n >= 2);
}

type Req = http::Request<ReplayBody<Full<Bytes>>>;

#[tokio::test(start_paused = true)]
async fn the_client_stack_from_config_retries_a_503() {
    let config = StackConfig::from_str(
        "[client]\npreset = \"standard_http_client\"\n[client.retry.backoff]\njitter = \"none\"\n",
        Format::Toml,
    )
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let downstream = service_fn({
        let calls = calls.clone();
        move |_req: Req| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let status = if n < 2 { 503 } else { 200 };
                let res = http::Response::builder().status(status).body(()).unwrap();
                Ok::<_, BoxError>(res)
            }
        }
    });
    let client = ServiceBuilder::new()
        .layer(config.client.layer().unwrap())
        .service(downstream);
    let req = http::Request::get("http://orders.internal/orders/7")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// The stack's per-authority bulkhead sits outside the per-authority breaker: a call
/// that waited for its bulkhead permit is not counted as slow for that wait. (Inside
/// the breaker, the bulkhead's wait ran on the breaker's clock: two calls of 100 ms
/// arriving together made the second a 200 ms "slow call" of our own making, and the
/// breaker opened on a healthy host.)
#[tokio::test(start_paused = true)]
async fn a_wait_for_a_bulkhead_permit_is_not_a_slow_call() {
    let layer = ClientConfig::from_str(
        "preset = \"standard_http_client\"\n\
         [bulkhead]\nmax_concurrent = 1\nmax_waiting = 1\nmax_wait = \"1s\"\n\
         [circuit_breaker]\nminimum_calls = 2\nslow_call_duration = \"150ms\"\n\
         slow_call_rate_threshold = 0.5\n",
        Format::Toml,
    )
    .unwrap()
    .layer()
    .unwrap();
    let downstream = service_fn(|_req: Req| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, BoxError>(http::Response::new(()))
    });
    let client = ServiceBuilder::new()
        .layer(layer.clone())
        .service(downstream);
    let get = || {
        http::Request::get("http://steady.test/")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let start = tokio::time::Instant::now();
    let (a, b) = tokio::join!(client.clone().oneshot(get()), client.clone().oneshot(get()));
    assert_eq!(a.unwrap().status(), 200);
    assert_eq!(b.unwrap().status(), 200);
    assert_eq!(start.elapsed(), Duration::from_millis(200), "one waited");
    let breaker = layer
        .breakers()
        .get(&http::uri::Authority::from_static("steady.test"))
        .expect("a breaker for the host");
    assert_eq!(breaker.metrics().calls(), 2);
    assert_eq!(breaker.metrics().slow_calls(), 0);
    assert_eq!(breaker.state(), postbox::circuit_breaker::State::Closed);
}

/// The config client around a gRPC channel: a trailers-only `UNAVAILABLE` (under
/// `200 OK`) is a failure, retried for a method declared safe to repeat, and counted by
/// the breaker until it opens; before, the stack took it for a `200` success.
#[tokio::test(start_paused = true)]
async fn the_client_stack_from_config_reads_a_grpc_status_in_the_headers() {
    let config = StackConfig::from_str(
        "[client]\npreset = \"standard_http_client\"\n\
         [client.retry]\nmax_retries = 1\nmax_retry_after = \"1s\"\nretry_unsafe_methods = true\n\
         [client.retry.budget]\nenabled = false\n\
         [client.retry.backoff]\njitter = \"none\"\n\
         [client.circuit_breaker]\nminimum_calls = 4\n",
        Format::Toml,
    )
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let channel = service_fn({
        let calls = calls.clone();
        move |_req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let res = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "14")
                    .header("grpc-message", "connection refused upstream")
                    .body(())
                    .unwrap();
                Ok::<_, BoxError>(res)
            }
        }
    });
    let layer = config.client.layer().unwrap();
    let breakers = layer.breakers();
    let client = ServiceBuilder::new().layer(layer).service(channel);
    let call = || {
        http::Request::post("http://echo.internal/echo.Echo/Say")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
            .unwrap()
    };
    let res = client.clone().oneshot(call()).await.unwrap();
    assert_eq!(
        res.headers()["grpc-status"],
        "14",
        "the last answer is returned"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "UNAVAILABLE is retried once"
    );
    let res = client.clone().oneshot(call()).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "14");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    let authority: http::uri::Authority = "echo.internal".parse().unwrap();
    assert_eq!(
        breakers.get(&authority).map(|b| b.state()),
        Some(postbox::circuit_breaker::State::Open),
        "four failures of four calls open the breaker"
    );
    let err = client.oneshot(call()).await.unwrap_err();
    assert!(
        postbox::error::find_cause::<postbox::circuit_breaker::error::Open>(&*err).is_some(),
        "{err}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "an open breaker sends nothing (its 5 s is past `max_retry_after`: no wait)"
    );
}

/// `retry.idempotent_grpc_methods` makes the gRPC methods it names safe to repeat, and
/// only those: an `UNAVAILABLE` (which may have taken effect) from a named method is
/// retried, from any other method it is returned at once. Before, a file could only
/// retry every method (`retry_unsafe_methods`) or none.
#[tokio::test(start_paused = true)]
async fn the_grpc_methods_a_config_names_idempotent_are_retried_and_no_others() {
    let config = StackConfig::from_str(
        "[client]\npreset = \"standard_http_client\"\n\
         [client.retry]\nmax_retries = 1\nidempotent_grpc_methods = [\"/echo.Echo/Say\", \"/shop.Catalog/*\"]\n\
         [client.retry.budget]\nenabled = false\n",
        Format::Toml,
    )
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let channel = service_fn({
        let calls = calls.clone();
        move |_req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let res = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "14")
                    .body(())
                    .unwrap();
                Ok::<_, BoxError>(res)
            }
        }
    });
    let client = ServiceBuilder::new()
        .layer(config.client.layer().unwrap())
        .service(channel);
    let call = |path: &str| {
        http::Request::post(format!("http://echo.internal{path}"))
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
            .unwrap()
    };
    for (path, attempts) in [
        ("/echo.Echo/Say", 2),
        ("/shop.Catalog/List", 2),
        ("/echo.Echo/Shout", 1),
        ("/shop.Orders/Place", 1),
    ] {
        calls.store(0, Ordering::SeqCst);
        let res = client.clone().oneshot(call(path)).await.unwrap();
        assert_eq!(res.headers()["grpc-status"], "14", "{path}");
        assert_eq!(calls.load(Ordering::SeqCst), attempts, "{path}");
    }
}

/// An `idempotent_grpc_methods` entry that names no method as meant is an error naming
/// the entry and its array's line, not a rule that silently retries nothing; a valid list is
/// rendered and read back.
#[test]
fn an_idempotent_grpc_method_that_names_no_method_is_an_error() {
    let text = "[client.retry]\nidempotent_grpc_methods = [\n  \"/echo.Echo/Say\",\n  \"/echo.Echo/\",\n]\n";
    let e = StackConfig::from_str(text, Format::Toml).unwrap_err();
    assert_eq!(
        e.field(),
        Some("client.retry.idempotent_grpc_methods[1]"),
        "{e}"
    );
    assert_eq!(e.line(), Some(2), "the array's line: {e}");
    let ok = StackConfig::from_str(
        "[client.retry]\nidempotent_grpc_methods = [\"/echo.Echo/Say\"]\n",
        Format::Toml,
    )
    .unwrap();
    let back = StackConfig::from_str(&ok.to_string(), Format::Toml).unwrap();
    assert_eq!(back, ok);
}

/// A request body that sends one message and then waits (a bidirectional call's client
/// waiting for an answer before its next message).
struct OneMessageThenWaits(bool);

impl http_body::Body for OneMessageThenWaits {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if std::mem::replace(&mut self.0, true) {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                b"\0\0\0\0\x02hi",
            )))))
        }
    }
}

/// `client.stream_through` names gRPC methods whose request bodies the client stack
/// does not buffer: a bidirectional call whose client waits for an answer is made at
/// once (buffered, it would wait for a body that never ends, to its deadline); a bad
/// pattern is an error naming the entry.
#[tokio::test(start_paused = true)]
async fn client_stream_through_sends_named_grpc_streams_unbuffered() {
    let config = ClientConfig::from_str(
        "preset = \"standard_http_client\"\nstream_through = [\"/chat.Chat/Talk\"]\n",
        Format::Toml,
    )
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let client = ServiceBuilder::new()
        .layer(config.layer().unwrap())
        .service(service_fn({
            let calls = calls.clone();
            move |_req: http::Request<ReplayBody<OneMessageThenWaits>>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, BoxError>(http::Response::new(())) }
            }
        }));
    let req = |path: &str| {
        http::Request::post(format!("http://chat.internal{path}"))
            .header("content-type", "application/grpc")
            .body(OneMessageThenWaits(false))
            .unwrap()
    };
    let start = tokio::time::Instant::now();
    client
        .clone()
        .oneshot(req("/chat.Chat/Talk"))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO, "made at once");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Not named: buffered, so the call waits for the body until the deadline.
    let err = client.oneshot(req("/chat.Chat/Other")).await.unwrap_err();
    assert!(
        postbox::error::is_caused_by::<postbox::timeout::error::DeadlineExceeded>(&*err),
        "{err}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let e =
        StackConfig::from_str("[client]\nstream_through = [\"*\"]\n", Format::Toml).unwrap_err();
    assert_eq!(e.field(), Some("client.stream_through[0]"));
    assert_eq!(e.line(), Some(2));
}

/// A body that sends nothing and never ends: a server that answered its head and hung.
struct Hangs;

impl http_body::Body for Hangs {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

/// `BodyDeadlineLayer` just above the client, inside the config's stack (as the README
/// shows it): a body that hangs after its head fails at the call's deadline (the
/// preset's 10 s), not at the 2 s attempt timeout whose end the request carries there
/// (the retry stopped watching the attempt when its head came), typed.
#[tokio::test(start_paused = true)]
async fn the_client_stack_with_a_body_deadline_ends_a_hung_body_at_the_calls_deadline() {
    use http_body_util::BodyExt;
    let config = ClientConfig::standard_http_client();
    let client = ServiceBuilder::new()
        .layer(config.layer().unwrap())
        .layer(postbox::timeout::BodyDeadlineLayer::new())
        .service(service_fn(|_req: Req| async {
            Ok::<_, BoxError>(http::Response::new(Hangs))
        }));
    let req = http::Request::get("http://orders.internal/orders/7")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let start = tokio::time::Instant::now();
    let res = client.oneshot(req).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(60), res.into_body().collect())
        .await
        .expect("ended by the body deadline")
        .unwrap_err();
    assert!(
        postbox::error::is_caused_by::<postbox::timeout::error::BodyDeadlineExceeded>(&*err),
        "{err}"
    );
    assert_eq!(start.elapsed(), config.deadline);
}

/// The `toml` blocks of `text` (lines after `prefix`; blocks with no such line, an
/// `include_str!` of a preset, are left out).
fn toml_blocks(text: &str, prefix: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        let Some(line) = line.strip_prefix(prefix) else {
            continue;
        };
        match (&mut block, line.trim_end()) {
            (None, "```toml") => block = Some(String::new()),
            (Some(_), "```") => blocks.extend(block.take().filter(|b| !b.trim().is_empty())),
            (Some(b), line) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// The config files the README and the `config` module docs show load as they are.
#[test]
fn the_config_examples_in_the_docs_load() {
    let readme = toml_blocks(include_str!("../../README.md"), "");
    let module = toml_blocks(include_str!("../../src/config/mod.rs"), "//! ");
    assert_eq!((readme.len(), module.len()), (1, 1), "examples found");
    for example in readme.iter().chain(&module) {
        if let Err(e) = StackConfig::from_str(example, Format::Toml) {
            panic!("{e}\nin:\n{example}");
        }
    }
}

/// In the server stack a keyed handler that outlives the deadline (it runs to its end,
/// so its effect is not cut in half) still holds its bulkhead permit until it ends:
/// such handlers count against `max_concurrent`. Its duplicate then gets the stored
/// answer. (With the bulkhead outside the idempotency layer, the permit went back at
/// the deadline while the handler ran on.)
#[tokio::test(start_paused = true)]
async fn a_keyed_handler_past_the_deadline_keeps_its_bulkhead_permit() {
    use http::{Request, Response, StatusCode};
    use tower::{Layer, Service};
    let config = ServerConfig::from_str(
        "deadline = \"1s\"\n[bulkhead]\nmax_concurrent = 1\n[idempotency]\nlock_for = \"10s\"\n",
        Format::Toml,
    )
    .unwrap();
    let layer = config.layer().unwrap();
    let effects = Arc::new(AtomicUsize::new(0));
    let handler = service_fn({
        let effects = effects.clone();
        move |_req: Request<_>| {
            let effects = effects.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                effects.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("done"))))
            }
        }
    });
    let mut svc = layer.layer(handler);
    let keyed = || {
        Request::post("http://shop.test/orders")
            .header("idempotency-key", "order-1")
            .body(Full::new(Bytes::from("{}")))
            .unwrap()
    };
    let res = svc.ready().await.unwrap().call(keyed()).await.unwrap();
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        layer.available_permits(),
        0,
        "the running handler gave its permit back"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    assert_eq!(layer.available_permits(), 1);
    let res = svc.ready().await.unwrap().call(keyed()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}

/// A duplicate waiting for the first request with its key does not hold a bulkhead
/// permit meanwhile: other requests are still served. (It held the permit its
/// `poll_ready` had reserved for the whole wait, so a burst of retries of one slow
/// request filled the bulkhead.)
#[tokio::test(start_paused = true)]
async fn a_waiting_duplicate_holds_no_bulkhead_permit() {
    use http::{Request, Response, StatusCode};
    use tower::Layer;
    let config = ServerConfig::from_str(
        "deadline = \"10s\"\n[bulkhead]\nmax_concurrent = 2\n[idempotency]\nlock_for = \"10s\"\n",
        Format::Toml,
    )
    .unwrap();
    let layer = config.layer().unwrap();
    let handler = service_fn(|req: Request<_>| async move {
        if req.headers().contains_key("idempotency-key") {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("done"))))
    });
    let svc = layer.layer(handler);
    let request = |key: Option<&str>| {
        let mut req = Request::post("http://shop.test/orders");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req.body(Full::new(Bytes::from("{}"))).unwrap()
    };
    let first = tokio::spawn(svc.clone().oneshot(request(Some("order-1"))));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let duplicate = tokio::spawn(svc.clone().oneshot(request(Some("order-1"))));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        layer.available_permits(),
        1,
        "the waiting duplicate holds a permit"
    );
    let other = svc.clone().oneshot(request(None)).await.unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    let duplicate = duplicate.await.unwrap().unwrap();
    assert_eq!(duplicate.headers()["idempotent-replayed"], "true");
    assert_eq!(layer.available_permits(), 2);
}

/// A repeat answered from the store holds no bulkhead permit while its body arrives to
/// be compared with the first request's: a burst of slow redeliveries must not turn
/// fresh requests away. (It held the readied service, and its permit, all along.)
#[tokio::test(start_paused = true)]
async fn a_repeat_answered_from_the_store_holds_no_bulkhead_permit_while_its_body_arrives() {
    use http::{Request, Response, StatusCode};
    use http_body_util::BodyExt;
    use tower::Layer;
    let config = ServerConfig::from_str("[bulkhead]\nmax_concurrent = 1\n", Format::Toml).unwrap();
    let layer = config.layer().unwrap();
    async fn read_whole<B: http_body::Body>(body: B) {
        let _ = body.collect().await;
    }
    let handler = service_fn(|req: Request<_>| async move {
        read_whole(req.into_body()).await;
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("done"))))
    });
    let svc = layer.layer(handler);
    let request = |key: Option<&str>, body: http_body_util::combinators::BoxBody<Bytes, _>| {
        let mut req = Request::post("http://shop.test/orders");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req.body(body).unwrap()
    };
    let whole = || Full::new(Bytes::from_static(b"\0\0\0\0\x02hi!!")).boxed();
    let first = svc
        .clone()
        .oneshot(request(Some("order-1"), whole()))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    // The repeat sends the first 7 of the 9 bytes, then waits.
    let repeat = tokio::spawn(
        svc.clone()
            .oneshot(request(Some("order-1"), OneMessageThenWaits(false).boxed())),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!repeat.is_finished());
    assert_eq!(layer.available_permits(), 1, "the repeat holds a permit");
    let other = svc.clone().oneshot(request(None, whole())).await.unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    repeat.abort();
}

/// A duplicate that waited runs the handler itself when the first answer is not
/// remembered (a `503`): its service is readied again first, so it takes a bulkhead
/// permit like any call.
#[tokio::test(start_paused = true)]
async fn a_duplicate_that_waited_runs_with_a_permit_when_the_first_failed() {
    use http::{Request, Response, StatusCode};
    use tower::Layer;
    let config = ServerConfig::from_str(
        "deadline = \"10s\"\n[bulkhead]\nmax_concurrent = 2\n[idempotency]\nlock_for = \"10s\"\n",
        Format::Toml,
    )
    .unwrap();
    let layer = config.layer().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = service_fn({
        let calls = calls.clone();
        move |_req: Request<_>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let mut res = Response::new(Full::new(Bytes::from("x")));
                if n == 0 {
                    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, std::convert::Infallible>(res)
            }
        }
    });
    let svc = layer.layer(handler);
    let keyed = || {
        Request::post("http://shop.test/orders")
            .header("idempotency-key", "order-1")
            .body(Full::new(Bytes::from("{}")))
            .unwrap()
    };
    let first = tokio::spawn(svc.clone().oneshot(keyed()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let duplicate = tokio::spawn(svc.clone().oneshot(keyed()));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        layer.available_permits(),
        1,
        "the duplicate runs with a permit"
    );
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    let duplicate = duplicate.await.unwrap().unwrap();
    assert_eq!(duplicate.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn count_dropped_is_off_by_default_and_loads_from_a_file() {
    let on =
        ClientConfig::from_str("[circuit_breaker]\ncount_dropped = true\n", Format::Toml).unwrap();
    assert!(on.circuit_breaker.count_dropped);
    let default = ClientConfig::from_str("", Format::Toml).unwrap();
    assert!(!default.circuit_breaker.count_dropped);
}

/// `idempotency.require_key` in a server config refuses an unsafe request without a key.
#[tokio::test]
async fn a_server_config_can_require_an_idempotency_key() {
    use http::{Request, Response, StatusCode};
    use tower::Layer;
    let config =
        ServerConfig::from_str("[idempotency]\nrequire_key = true\n", Format::Toml).unwrap();
    assert!(config.idempotency.require_key);
    assert!(
        !ServerConfig::from_str("", Format::Toml)
            .unwrap()
            .idempotency
            .require_key
    );
    let handler = service_fn(|_req: Request<_>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("done"))))
    });
    let svc = config.layer().unwrap().layer(handler);
    let post = |key: Option<&str>| {
        let mut req = Request::post("http://shop.test/orders");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req.body(Full::new(Bytes::from("{}"))).unwrap()
    };
    let refused = svc.clone().oneshot(post(None)).await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let ok = svc.oneshot(post(Some("order-1"))).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

/// Behind the enqueue fallback, a write to a host whose breaker is open is deferred at
/// once (`circuit-open`). Before, the retry inside waited out the break (5 s in the
/// preset) first, and the caller got its "accepted" receipt that much later. The same
/// stack without a fallback still waits for a break it is allowed to.
#[tokio::test(start_paused = true)]
async fn a_deferring_stack_defers_a_write_an_open_breaker_rejects_at_once() {
    type Deferred = http::Request<ReplayBody<postbox::enqueue::BufferedBody<Full<Bytes>>>>;
    let config = ClientConfig::from_str(
        "preset = \"standard_http_client\"\n\
         [retry.budget]\nenabled = false\n\
         [circuit_breaker]\nminimum_calls = 2\n\
         [enqueue]\nenabled = true\n",
        Format::Toml,
    )
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let downstream = service_fn({
        let calls = calls.clone();
        move |_req: Deferred| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                let res = http::Response::builder()
                    .status(503)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                Ok::<_, BoxError>(res)
            }
        }
    });
    let queue = Arc::new(postbox::queue::MemoryQueue::new());
    let client = ServiceBuilder::new()
        .layer(config.deferring_layer(queue.clone()).unwrap())
        .service(downstream);
    let post = || {
        http::Request::post("http://orders.test/orders")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    for _ in 0..2 {
        let res = client.clone().oneshot(post()).await.unwrap();
        assert!(
            res.headers()
                .contains_key(postbox::enqueue::DEFER_REASON_HEADER)
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "a POST after a 503 is not retried"
    );
    let start = tokio::time::Instant::now();
    let res = client.clone().oneshot(post()).await.unwrap();
    assert_eq!(
        res.headers()[postbox::enqueue::DEFER_REASON_HEADER],
        "circuit-open"
    );
    assert!(
        start.elapsed() < Duration::from_millis(100),
        "deferred after {:?}",
        start.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        config.layer().unwrap().retry().policy().max_open_wait(),
        config.retry.max_retry_after.min(config.deadline),
        "without a fallback, the break is waited for as a server's hint would be"
    );
}

/// The client stack has a bulkhead per authority: a host that answers slowly fills its
/// own, and calls to the other hosts go on. With one bulkhead for the stack, the slow
/// host's calls took every permit and every call to a healthy host was turned away.
#[tokio::test(start_paused = true)]
async fn a_slow_host_does_not_take_the_bulkhead_permits_of_another() {
    let layer = ClientConfig::from_str(
        "preset = \"standard_http_client\"\n[bulkhead]\nmax_concurrent = 2\n",
        Format::Toml,
    )
    .unwrap()
    .layer()
    .unwrap();
    let downstream = service_fn(|req: Req| async move {
        if req.uri().host() == Some("slow.test") {
            std::future::pending::<()>().await;
        }
        Ok::<_, BoxError>(http::Response::new(()))
    });
    let client = ServiceBuilder::new()
        .layer(layer.clone())
        .service(downstream);
    let get = |uri: &str| {
        http::Request::get(uri)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(client.clone().oneshot(get("http://slow.test/"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let slow_test = http::uri::Authority::from_static("slow.test");
    assert_eq!(layer.available_permits(&slow_test), 0);
    let err = client
        .clone()
        .oneshot(get("http://slow.test/"))
        .await
        .unwrap_err();
    assert!(
        postbox::error::find_cause::<postbox::bulkhead::error::Full>(&*err).is_some(),
        "{err}"
    );
    for _ in 0..3 {
        let res = client
            .clone()
            .oneshot(get("http://fast.test/"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    for call in slow {
        call.abort();
    }
}

/// A replay is cut off a tenth of its lease and `ack_interval` before the lease ends;
/// a client deadline longer than that would never be reached by a replay, and the
/// file says where: `client.replay.lease_for`. A bad replay setting names its field.
#[test]
fn a_replay_lease_too_short_for_the_deadline_is_an_error_at_replay_lease_for() {
    let on = "[client.enqueue]\nenabled = true\n";
    let text = format!("[client]\ndeadline = \"30s\"\n[client.replay]\nlease_for = \"30s\"\n{on}");
    let e = StackConfig::from_str(&text, Format::Toml).unwrap_err();
    assert_eq!(e.field(), Some("client.replay.lease_for"), "{e}");
    assert_eq!(e.line(), Some(4), "{e}");
    let text = format!("[client]\ndeadline = \"30s\"\n[client.replay]\nlease_for = \"40s\"\n{on}");
    let c = StackConfig::from_str(&text, Format::Toml).unwrap();
    assert_eq!(c.client.replay.lease_for, Duration::from_secs(40));
    // A stack that does not defer has no replayer: its section is not checked.
    let text = "[client]\ndeadline = \"60s\"\n[client.replay]\nconcurrency = 0\n";
    StackConfig::from_str(text, Format::Toml).unwrap();
    for (text, field) in [
        (
            "[client.replay]\nconcurrency = 0\n",
            "client.replay.concurrency",
        ),
        (
            "[client.replay]\nbackoff_base = \"10m\"\nbackoff_max = \"1m\"\n",
            "client.replay.backoff_base",
        ),
        (
            "[client.replay]\nack_interval = \"40s\"\n",
            "client.replay.ack_interval",
        ),
    ] {
        let e = StackConfig::from_str(&format!("{text}{on}"), Format::Toml).unwrap_err();
        assert_eq!(e.field(), Some(field), "{e}");
    }
}

/// `[client.classify]` overrides reach every layer of the stack: a `409` listed as a
/// retryable failure is retried (by default it is an answer, returned as is) and
/// counted by the breaker; a status in two lists, or no status at all, is an error
/// naming the list.
#[tokio::test(start_paused = true)]
async fn classify_overrides_reach_the_retry_and_the_breaker() {
    let config = ClientConfig::from_str(
        "preset = \"standard_http_client\"\n\
         [retry.budget]\nenabled = false\n\
         [circuit_breaker]\nminimum_calls = 2\n\
         [classify]\nretryable_failure = [409]\n",
        Format::Toml,
    )
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let downstream = service_fn({
        let calls = calls.clone();
        move |_req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                let res = http::Response::builder().status(409).body(()).unwrap();
                Ok::<_, BoxError>(res)
            }
        }
    });
    let layer = config.layer().unwrap();
    let breakers = layer.breakers();
    let client = ServiceBuilder::new().layer(layer).service(downstream);
    let get = || {
        http::Request::get("http://locked.test/orders/7")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let res = client.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 409);
    assert_eq!(calls.load(Ordering::SeqCst), 3, "retried twice");
    let authority = http::uri::Authority::from_static("locked.test");
    // Two failures of two calls opened it; the last retry waited out the break and
    // was its first probe, which failed.
    assert_eq!(
        breakers.get(&authority).map(|b| b.state()),
        Some(postbox::circuit_breaker::State::HalfOpen),
        "the 409s count as failures"
    );

    // Without the override a 409 is an answer.
    let plain = ClientConfig::from_str("preset = \"standard_http_client\"\n", Format::Toml)
        .unwrap()
        .layer()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let downstream = service_fn({
        let calls = calls.clone();
        move |_req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(http::Response::builder().status(409).body(()).unwrap()) }
        }
    });
    let client = ServiceBuilder::new().layer(plain).service(downstream);
    assert_eq!(client.oneshot(get()).await.unwrap().status(), 409);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    for (text, field) in [
        (
            "[classify]\nretryable_failure = [409]\nsuccess = [409]\n",
            "classify.success",
        ),
        ("[classify]\nfailure = [42]\n", "classify.failure"),
        ("[classify]\nsuccess = [200]\n", "classify.success"),
        (
            "[classify]\nretryable_failure = [429]\n",
            "classify.retryable_failure",
        ),
    ] {
        let e = ClientConfig::from_str(text, Format::Toml).unwrap_err();
        assert_eq!(e.field(), Some(field), "{e}");
    }
}
