//! Reading config text: formats, presets, and errors that say where.

use super::{ClientConfig, PRESETS, SERVER, STANDARD_HTTP_CLIENT, ServerConfig, StackConfig};
use crate::error::ConfigError;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::error::Error;
use std::fmt;
use std::path::{Path, PathBuf};

/// A config file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// TOML (`.toml`).
    Toml,
    /// YAML (`.yaml`, `.yml`).
    Yaml,
    /// JSON (`.json`).
    Json,
}

impl Format {
    /// The format of a file, from its extension (in any case: `stack.YAML` too).
    pub fn from_path(path: impl AsRef<Path>) -> Option<Self> {
        match path
            .as_ref()
            .extension()?
            .to_str()?
            .to_ascii_lowercase()
            .as_str()
        {
            "toml" => Some(Self::Toml),
            "yaml" | "yml" => Some(Self::Yaml),
            "json" => Some(Self::Json),
            _ => None,
        }
    }

    /// `"TOML"`, `"YAML"` or `"JSON"`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Toml => "TOML",
            Self::Yaml => "YAML",
            Self::Json => "JSON",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug)]
enum Kind {
    Io(std::io::Error),
    UnknownFormat,
    Syntax(String),
    Invalid(ConfigError),
}

/// A config that could not be read: unreadable, malformed, or invalid.
///
/// Says where: [`line`](Self::line) and [`column`](Self::column) (1-based) when known,
/// and [`field`](Self::field) — the unknown field's name, the key on the offending line,
/// or the dotted path of a field that failed validation.
///
/// ```text
/// client.toml: line 7, column 1: unknown field `max_retry`, expected one of `max_retries`, … (field `max_retry`)
/// client.toml: line 3: invalid configuration: `client.attempt_timeout` (2s) must be at most `client.deadline` (1s): …
/// ```
#[derive(Debug)]
pub struct LoadError(Box<Repr>);

#[derive(Debug)]
struct Repr {
    path: Option<PathBuf>,
    format: Option<Format>,
    kind: Kind,
    field: Option<String>,
    line: Option<usize>,
    column: Option<usize>,
}

// === impl LoadError ===

impl LoadError {
    fn new(format: Option<Format>, kind: Kind) -> Self {
        Self(Box::new(Repr {
            path: None,
            format,
            kind,
            field: None,
            line: None,
            column: None,
        }))
    }

    fn at(mut self, field: Option<String>, line: Option<usize>, column: Option<usize>) -> Self {
        self.0.field = field;
        self.0.line = line;
        self.0.column = column;
        self
    }

    fn with_path(mut self, path: &Path) -> Self {
        self.0.path = Some(path.to_owned());
        self
    }

    /// The file, when read with [`StackConfig::load`].
    pub fn path(&self) -> Option<&Path> {
        self.0.path.as_deref()
    }

    /// The format the text was read as.
    pub fn format(&self) -> Option<Format> {
        self.0.format
    }

    /// The 1-based line of the problem, when known.
    pub fn line(&self) -> Option<usize> {
        self.0.line
    }

    /// The 1-based column of the problem, when known.
    pub fn column(&self) -> Option<usize> {
        self.0.column
    }

    /// The field at fault: an unknown field's name, the key of the offending line, or
    /// the dotted path of an invalid field (`client.attempt_timeout`).
    pub fn field(&self) -> Option<&str> {
        self.0.field.as_deref()
    }

    /// `true` for an unknown field.
    pub fn is_unknown_field(&self) -> bool {
        matches!(&self.0.kind, Kind::Syntax(m) if m.contains("unknown field"))
    }

    /// The validation error, if the text was well formed but invalid.
    pub fn config_error(&self) -> Option<&ConfigError> {
        match &self.0.kind {
            Kind::Invalid(e) => Some(e),
            _ => None,
        }
    }

    /// What is wrong, without the location.
    pub fn message(&self) -> String {
        match &self.0.kind {
            Kind::Io(e) => e.to_string(),
            Kind::UnknownFormat => {
                "unknown config format: expected a .toml, .yaml, .yml or .json file".into()
            }
            Kind::Syntax(m) => m.clone(),
            Kind::Invalid(e) => e.to_string(),
        }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.0.path {
            write!(f, "{}: ", p.display())?;
        }
        match (self.0.line, self.0.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: ")?,
            (Some(l), None) => write!(f, "line {l}: ")?,
            _ => {}
        }
        f.write_str(&self.message())?;
        if let (Kind::Syntax(m), Some(field)) = (&self.0.kind, &self.0.field)
            && !m.contains(&format!("`{field}`"))
        {
            write!(f, " (field `{field}`)")?;
        }
        Ok(())
    }
}

impl Error for LoadError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &self.0.kind {
            Kind::Io(e) => Some(e),
            Kind::Invalid(e) => Some(e),
            _ => None,
        }
    }
}

/// The 1-based line and column of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The key written on 1-based `line` (`key = …`, `key: …`, `"key": …`), if any.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let l = l.trim_start().trim_start_matches('-').trim_start();
    let end = l.find(['=', ':'])?;
    let key = l[..end].trim().trim_matches(['"', '\'']).trim();
    let key = key.rsplit('.').next()?;
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    ok.then(|| key.to_owned())
}

/// The key whose value is at 1-based `line`, `col`: the name before the last `=` or `:`
/// ahead of the column (inline tables included).
fn key_at(text: &str, line: usize, col: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let prefix: String = l.chars().take(col.saturating_sub(1)).collect();
    let end = prefix.rfind(['=', ':'])?;
    let before = prefix[..end].trim_end().trim_end_matches(['"', '\'']);
    let start = before
        .char_indices()
        .rev()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .map_or(0, |(i, c)| i + c.len_utf8());
    let key = &before[start..];
    (!key.is_empty()).then(|| key.to_owned())
}

/// The name in a serde "unknown field `x`" message.
fn unknown_field(message: &str) -> Option<String> {
    let rest = &message[message.find("unknown field `")? + "unknown field `".len()..];
    Some(rest[..rest.find('`')?].to_owned())
}

/// Best effort: the line that sets the dotted `field` (searching its segments in order).
fn line_of_field(text: &str, field: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0;
    let mut found = None;
    // An array's entry (`stream_through[1]`) is found by its array's key.
    let segments: Vec<&str> = field
        .split('.')
        .map(|seg| seg.split_once('[').map_or(seg, |(key, _)| key))
        .collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let hit = (from..lines.len()).find(|&n| mentions_key(lines[n], seg));
        match hit {
            Some(n) => {
                from = n;
                if last {
                    found = Some(n + 1);
                }
            }
            None if last => return None,
            None => {}
        }
    }
    found
}

fn mentions_key(line: &str, key: &str) -> bool {
    // An empty name (`{"": 1}`) is found everywhere and nowhere: it locates nothing
    // (and `find("")` would never move on).
    if key.is_empty() {
        return false;
    }
    let mut rest = line;
    while let Some(i) = rest.find(key) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + key.len()..].trim_start().chars().next();
        let word_start = before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let word_end = matches!(after, Some('=' | ':' | ']' | '"' | '\'' | '.'));
        if word_start && word_end {
            return true;
        }
        rest = &rest[i + key.len()..];
    }
    false
}

/// Drops serde_json's and serde_yaml's " at line L column C" suffix.
fn strip_location(message: String) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].trim_end_matches(',').to_owned(),
        None => message,
    }
}

/// The line and column of the value a message quotes as "duration `v`", searched from
/// line `from`, where the parser placed the error: for errors of custom deserializers,
/// serde_yaml places them at the start of the enclosing map (searched forward),
/// serde_json at its end (searched backward), toml at or before the value. The value
/// standing whole (`"500"`, not inside `"500ms"`) comes first, and first of all where it
/// is the value of the field the error is in (`path`, when known): an earlier value
/// that looks the same (`max_retries: 2` before `deadline: 2`) is another field's.
fn quoted_value(
    text: &str,
    format: Format,
    message: &str,
    from: usize,
    path: Option<&str>,
) -> Option<(usize, usize)> {
    const P: &str = "duration `";
    let rest = &message[message.find(P)? + P.len()..];
    let value = &rest[..rest.find('`')?];
    if value.trim().is_empty() {
        return None;
    }
    fn whole<'a>(l: &'a str, value: &'a str) -> impl Iterator<Item = usize> + 'a {
        l.match_indices(value).map(|(c, _)| c).filter(move |&c| {
            let before = l[..c].chars().next_back();
            let after = l[c + value.len()..].chars().next();
            before.is_none_or(|b| matches!(b, '"' | '\'' | ' ' | '\t' | ':' | '='))
                && after.is_none_or(|a| matches!(a, '"' | '\'' | ' ' | '\t' | ',' | '}' | '#'))
        })
    }
    let all: Vec<(usize, &str)> = text.lines().enumerate().collect();
    let at = |n: usize, l: &str, c: usize| (n + 1, l[..c].chars().count() + 1);
    // The field's own value: its key before it, from the line that sets the field.
    let key = path
        .and_then(|p| p.rsplit('.').next())
        .map(|k| k.split('[').next().unwrap_or(k));
    if let Some(key) = key.filter(|k| !k.is_empty()) {
        let start = path.and_then(|p| line_of_field(text, p)).unwrap_or(1) - 1;
        let own = all[start.min(all.len())..]
            .iter()
            .chain(&all)
            .find_map(|&(n, l)| {
                whole(l, value)
                    .map(|c| at(n, l, c))
                    .find(|&(ln, col)| key_at(text, ln, col).as_deref() == Some(key))
            });
        if own.is_some() {
            return own;
        }
    }
    let lines: Vec<(usize, &str)> = match format {
        Format::Json => all[..from.min(all.len())].iter().rev().copied().collect(),
        _ => all[from.saturating_sub(1).min(all.len())..].to_vec(),
    };
    let found = |find: &dyn Fn(&str) -> Option<usize>| {
        lines
            .iter()
            .chain(&all)
            .find_map(|&(n, l)| find(l).map(|c| at(n, l, c)))
    };
    found(&|l: &str| whole(l, value).next()).or_else(|| found(&|l: &str| l.find(value)))
}

/// The dotted path of the field a value in `text` failed to parse in
/// (`client.deadline`), found by parsing again with the path tracked: only on an
/// error's path, so a load that succeeds pays nothing for it.
fn error_path<T: DeserializeOwned>(text: &str, format: Format) -> Option<String> {
    let path = match format {
        Format::Toml => {
            let de = toml::Deserializer::parse(text).ok()?;
            serde_path_to_error::deserialize::<_, T>(de)
                .err()?
                .path()
                .to_string()
        }
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize::<_, T>(&mut de)
                .err()?
                .path()
                .to_string()
        }
        Format::Yaml => {
            let de = serde_yaml::Deserializer::from_str(text);
            serde_path_to_error::deserialize::<_, T>(de)
                .err()?
                .path()
                .to_string()
        }
    };
    // `?` stands for a segment it could not name; `.` for the root.
    (!path.contains('?') && path != ".").then_some(path)
}

fn syntax(
    text: &str,
    format: Format,
    message: String,
    mut line: Option<usize>,
    mut col: Option<usize>,
    path: Option<&str>,
) -> LoadError {
    if let Some((l, c)) = quoted_value(text, format, &message, line.unwrap_or(1), path) {
        (line, col) = (Some(l), Some(c));
    }
    let unknown = unknown_field(&message);
    if let (Some(name), Some(l)) = (&unknown, line) {
        // serde_yaml reports a field of a tagged table at the table's key: look further.
        let lines: Vec<&str> = text.lines().collect();
        if !lines.get(l - 1).is_some_and(|t| mentions_key(t, name))
            && let Some(n) = (l..lines.len()).find(|&n| mentions_key(lines[n], name))
        {
            line = Some(n + 1);
            col = lines[n]
                .find(name.as_str())
                .map(|c| lines[n][..c].chars().count() + 1);
        }
    }
    let field = unknown.or_else(|| match (line, col) {
        (Some(l), Some(c)) => key_at(text, l, c).or_else(|| key_on_line(text, l)),
        (Some(l), None) => key_on_line(text, l),
        _ => None,
    });
    LoadError::new(Some(format), Kind::Syntax(message)).at(field, line, col)
}

/// Parses `text` as `T`, with errors located in `text`.
fn parse<T: DeserializeOwned>(text: &str, format: Format) -> Result<T, LoadError> {
    // A bad value's field, for the messages that quote the value (not the field).
    let path = |message: &str| {
        message
            .contains("duration `")
            .then(|| error_path::<T>(text, format))
            .flatten()
    };
    let syntax = |message: String, line, col| {
        let path = path(&message);
        syntax(text, format, message, line, col, path.as_deref())
    };
    match format {
        Format::Toml => toml::from_str(text).map_err(|e| {
            let (line, col) = match e.span() {
                Some(s) => {
                    let (l, c) = position(text, s.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            syntax(e.message().trim().to_owned(), line, col)
        }),
        Format::Json => serde_json::from_str(text).map_err(|e| {
            let (line, col) = (e.line(), e.column());
            let (line, col) = if line == 0 {
                (None, None)
            } else {
                (Some(line), Some(col))
            };
            syntax(strip_location(e.to_string()), line, col)
        }),
        Format::Yaml => serde_yaml::from_str(text).map_err(|e| {
            let loc = e.location();
            syntax(
                strip_location(e.to_string()),
                loc.as_ref().map(|l| l.line()),
                loc.as_ref().map(|l| l.column()),
            )
        }),
    }
}

fn preset_text(name: &str, section: &str) -> Option<&'static str> {
    match (name, section) {
        ("standard_http_client", "client") => Some(STANDARD_HTTP_CLIENT),
        ("server", "server") => Some(SERVER),
        _ => None,
    }
}

/// Merges `over` onto `base`: tables field by field, everything else replaced; a table
/// whose `type` tag changes is replaced whole.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(bv @ Value::Object(_)) if v.is_object() && !tag_changes(bv, &v) => {
                        merge(bv, v)
                    }
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn tag_changes(base: &Value, over: &Value) -> bool {
    match (base.get("type"), over.get("type")) {
        (Some(a), Some(b)) => a != b,
        _ => false,
    }
}

/// Replaces a section with a `preset` by the preset merged with the section.
fn resolve(section: &mut Value, kind: &str, path: &str) -> Result<(), ConfigError> {
    let Some(name) = section.get("preset") else {
        return Ok(());
    };
    let field = if path.is_empty() {
        "preset".to_owned()
    } else {
        format!("{path}.preset")
    };
    let Some(name) = name.as_str() else {
        return Err(ConfigError::new(field, "must be a string"));
    };
    let Some(text) = preset_text(name, kind) else {
        let names: Vec<String> = PRESETS
            .iter()
            .filter(|(_, s)| *s == kind)
            .map(|(n, _)| format!("`{n}`"))
            .collect();
        return Err(ConfigError::new(
            field,
            format!(
                "names an unknown {kind} preset `{name}` (expected {})",
                names.join(" or ")
            ),
        ));
    };
    let mut base: Value = toml::from_str(text).expect("the shipped presets parse");
    merge(&mut base, std::mem::take(section));
    *section = base;
    Ok(())
}

fn to_value(text: &str, format: Format) -> Result<Value, LoadError> {
    let Tree(v) = parse(text, format)?;
    Ok(match v {
        // An empty YAML document is an empty config. (A JSON `null` is refused by the
        // strict typed parse before.)
        Value::Null => Value::Object(Map::new()),
        mut v => {
            empty_tables(&mut v);
            v
        }
    })
}

/// A value tree that refuses a key given twice in one table, as the typed parse does
/// (JSON's and YAML's plain value trees keep the last one: a duplicate went unnoticed
/// whenever the typed parse had stopped earlier, at a field a preset supplies).
struct Tree(Value);

impl<'de> serde::Deserialize<'de> for Tree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TreeVisitor).map(Tree)
    }
}

struct TreeVisitor;

impl<'de> serde::de::Visitor<'de> for TreeVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a configuration value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    // NaN and infinity become `null`, as in a plain value tree (see `load_with`).
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Tree(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate field `{key}`"
                )));
            }
            let Tree(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// The keys whose values are tables (sections). Every optional field is a scalar, for
/// which `null` means "none".
const TABLES: &[&str] = &[
    "client",
    "server",
    "retry",
    "backoff",
    "budget",
    "circuit_breaker",
    "window",
    "breaker_keys",
    "bulkhead",
    "enqueue",
    "replay",
    "classify",
    "idempotency",
];

/// Reads a table key with no value (`retry:` in YAML with nothing under it, or every
/// line under it commented out) as an empty table, as the typed parse of YAML does: its defaults, or the preset's table unchanged. (The value tree held `null`,
/// which failed after the preset, or replaced the preset's whole table.) A `preset`
/// key with no value is no preset.
fn empty_tables(v: &mut Value) {
    if let Value::Object(map) = v {
        if map.get("preset").is_some_and(Value::is_null) {
            map.remove("preset");
        }
        for (k, val) in map.iter_mut() {
            if val.is_null() && TABLES.contains(&k.as_str()) {
                *val = Value::Object(Map::new());
            } else {
                empty_tables(val);
            }
        }
    }
}

fn invalid(text: &str, format: Format, e: ConfigError) -> LoadError {
    let (field, line) = (e.field().to_owned(), line_of_field(text, e.field()));
    LoadError::new(Some(format), Kind::Invalid(e)).at(Some(field), line, None)
}

thread_local! {
    /// Set while [`load_with`] parses: only then is a `preset` field taken.
    static LOADING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Reads a section's `preset` field: refused outside the loader, which alone applies
/// presets. A config read through serde alone (`serde_json::from_str`, a field of an
/// application's own config struct) kept the preset's name and the built-in defaults:
/// a `standard_http_client` that was not one.
pub(super) fn preset_name<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    use serde::Deserialize as _;
    let name = Option::<String>::deserialize(d)?;
    if name.is_some() && !LOADING.with(std::cell::Cell::get) {
        return Err(serde::de::Error::custom(
            "a preset is applied by the loader (`StackConfig::from_str`, `load`, \
             `ClientConfig::preset`, `ServerConfig::preset`): read through serde alone, \
             it would be ignored",
        ));
    }
    Ok(name)
}

/// Sets [`LOADING`] for its life (put back as it was, a panic too).
struct Loading(bool);

impl Loading {
    fn start() -> Self {
        Self(LOADING.with(|l| l.replace(true)))
    }
}

impl Drop for Loading {
    fn drop(&mut self) {
        LOADING.with(|l| l.set(self.0));
    }
}

/// The common pipeline: strict typed parse (errors with lines), presets on the value
/// tree, typed again, validated.
fn load_with<T: DeserializeOwned>(
    text: &str,
    format: Format,
    presets: impl FnOnce(&mut Value) -> Result<(), ConfigError>,
    validate: impl FnOnce(&T) -> Result<(), ConfigError>,
) -> Result<T, LoadError> {
    let _loading = Loading::start();
    // A section that overrides part of a preset's table (the breaker's window without
    // its `type`) is incomplete on its own: its strict parse misses a field the merge
    // with the preset supplies. Any other strict error is the answer (with its line).
    // Nor is a YAML table key with no value whose type is a tagged enum (the breaker's
    // `window:` with every line under it commented out): the typed parse reads a unit
    // it cannot take, the value tree an empty table, the preset's window unchanged.
    let strict = match parse::<T>(text, format) {
        Err(e)
            if !(e.to_string().contains("missing field")
                || e.to_string()
                    .contains("invalid type: unit value, expected internally tagged enum")) =>
        {
            return Err(e);
        }
        other => other,
    };
    // (Its own error when the value tree fails too: the strict parse stopped only at a
    // field the preset may supply, the tree at what is wrong, a duplicate key say.)
    let mut value = to_value(text, format)?;
    let before = strict.is_ok().then(|| value.clone());
    presets(&mut value).map_err(|e| invalid(text, format, e))?;
    // No preset changed anything: the strict parse is the config. (The value tree
    // reads a YAML key whose list items are all commented out as `null`, where the
    // typed parse reads `[]`: it failed, naming neither field nor line.)
    let strict = match strict {
        Ok(config) if before.as_ref() == Some(&value) => {
            validate(&config).map_err(|e| invalid(text, format, e))?;
            return Ok(config);
        }
        other => other,
    };
    let config: T = match serde_path_to_error::deserialize(value) {
        Ok(config) => config,
        Err(e) => {
            let path = e.path().to_string();
            let path = (!path.contains('?') && path != ".").then_some(path);
            let e = e.into_inner();
            // Still missing a field: the strict error says where.
            let strict = match strict {
                Err(strict) if e.to_string().contains("missing field") => return Err(strict),
                other => other,
            };
            // The value tree has no NaN nor infinity (they become `null`): the typed
            // parse has them, and its validation names the field. (Only that answer
            // is taken from it: without the presets, another check may not hold.)
            if let Ok(strict) = &strict
                && let Err(e) = validate(strict)
                && e.message().contains("finite")
            {
                return Err(invalid(text, format, e));
            }
            // Without a typed parse to ask (it missed a field the preset supplies), a
            // `null` where a number goes is the NaN or infinity the tree cannot hold.
            if let Some(path) = &path
                && e.to_string()
                    .starts_with("invalid type: null, expected f64")
            {
                let e = ConfigError::new(path.clone(), "must be a finite number");
                return Err(invalid(text, format, e));
            }
            let message = format!("after applying the preset: {e}");
            // Located in the text where it names a key of it (an unknown field), or
            // by the path of the field it failed in.
            if let Some(field) = unknown_field(&message) {
                let line = line_of_field(text, &field);
                return Err(syntax(text, format, message, line, None, None));
            }
            let line = path.as_deref().and_then(|p| line_of_field(text, p));
            return Err(LoadError::new(Some(format), Kind::Syntax(message)).at(path, line, None));
        }
    };
    validate(&config).map_err(|e| invalid(text, format, e))?;
    Ok(config)
}

fn read(path: &Path) -> Result<(String, Format), LoadError> {
    let format = Format::from_path(path)
        .ok_or_else(|| LoadError::new(None, Kind::UnknownFormat).with_path(path))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| LoadError::new(Some(format), Kind::Io(e)).with_path(path))?;
    Ok((text, format))
}

// === impl StackConfig ===

impl StackConfig {
    /// Reads `text` in `format`, applies the sections' presets, and validates.
    ///
    /// # Errors
    /// A [`LoadError`]: malformed text, an unknown field, a bad value or unit, an
    /// unknown preset, or a failed validation ([`StackConfig::validate`]).
    #[allow(
        clippy::should_implement_trait,
        reason = "takes a format; FromStr cannot"
    )]
    pub fn from_str(text: &str, format: Format) -> Result<Self, LoadError> {
        load_with(
            text,
            format,
            |v| {
                if let Some(obj) = v.as_object_mut() {
                    if let Some(c) = obj.get_mut("client") {
                        resolve(c, "client", "client")?;
                    }
                    if let Some(s) = obj.get_mut("server") {
                        resolve(s, "server", "server")?;
                    }
                }
                Ok(())
            },
            Self::validate,
        )
    }

    /// Reads the file at `path`, its format from the extension (`.toml`, `.yaml`,
    /// `.yml`, `.json`).
    ///
    /// # Errors
    /// As [`from_str`](Self::from_str), plus an unreadable file or unknown extension;
    /// the error carries the path.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        load_file(path.as_ref(), Self::from_str)
    }
}

/// Reads the file at `path` and parses it with `from_str`; an error carries the path.
fn load_file<T>(
    path: &Path,
    from_str: fn(&str, Format) -> Result<T, LoadError>,
) -> Result<T, LoadError> {
    let (text, format) = read(path)?;
    from_str(&text, format).map_err(|e| e.with_path(path))
}

// === impl ClientConfig ===

impl ClientConfig {
    /// Reads a client section on its own (its fields at the top level, named
    /// `preset`, `deadline`, … in errors), applies its preset, and validates.
    ///
    /// # Errors
    /// As [`StackConfig::from_str`].
    #[allow(
        clippy::should_implement_trait,
        reason = "takes a format; FromStr cannot"
    )]
    pub fn from_str(text: &str, format: Format) -> Result<Self, LoadError> {
        load_with(
            text,
            format,
            |v| resolve(v, "client", ""),
            |c: &Self| c.validate_at(""),
        )
    }

    /// Reads a client section from the file at `path`.
    ///
    /// # Errors
    /// As [`StackConfig::load`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        load_file(path.as_ref(), Self::from_str)
    }
}

// === impl ServerConfig ===

impl ServerConfig {
    /// Reads a server section on its own, applies its preset, and validates.
    ///
    /// # Errors
    /// As [`StackConfig::from_str`].
    #[allow(
        clippy::should_implement_trait,
        reason = "takes a format; FromStr cannot"
    )]
    pub fn from_str(text: &str, format: Format) -> Result<Self, LoadError> {
        load_with(
            text,
            format,
            |v| resolve(v, "server", ""),
            |c: &Self| c.validate_at(""),
        )
    }

    /// Reads a server section from the file at `path`.
    ///
    /// # Errors
    /// As [`StackConfig::load`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        load_file(path.as_ref(), Self::from_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_format_is_read_from_its_extension_in_any_case() {
        for (path, format) in [
            ("stack.toml", Some(Format::Toml)),
            ("stack.YAML", Some(Format::Yaml)),
            ("dir/stack.Yml", Some(Format::Yaml)),
            ("stack.JSON", Some(Format::Json)),
            ("stack.ini", None),
            ("stack", None),
        ] {
            assert_eq!(Format::from_path(path), format, "{path}");
        }
    }

    /// A key given twice is refused in JSON and YAML even when the typed parse stops
    /// first at a field the preset supplies (a window's `type`). (The value tree kept
    /// the last one, and the file loaded.)
    #[test]
    fn a_key_given_twice_is_refused_beside_a_partial_preset_override() {
        let json = r#"{"client":{"preset":"standard_http_client","circuit_breaker":{"window":{"duration":"60s"}},"deadline":"3s","deadline":"9s"}}"#;
        let yaml = "client:\n  preset: standard_http_client\n  circuit_breaker:\n    window:\n      duration: 60s\n  deadline: 3s\n  deadline: 9s\n";
        for (text, format) in [(json, Format::Json), (yaml, Format::Yaml)] {
            let e = StackConfig::from_str(text, format).unwrap_err();
            assert!(e.to_string().contains("duplicate"), "{format:?}: {e}");
        }
        // Without the duplicate, the same override loads.
        let once = json.replace(r#","deadline":"9s""#, "");
        let config = StackConfig::from_str(&once, Format::Json).unwrap();
        assert_eq!(config.client.deadline, std::time::Duration::from_secs(3));
    }

    #[test]
    fn merge_replaces_a_table_whose_type_changes() {
        let mut base = serde_json::json!({"w": {"type": "count", "size": 3}, "a": 1});
        merge(
            &mut base,
            serde_json::json!({"w": {"type": "time", "duration": "1s"}, "b": 2}),
        );
        assert_eq!(
            base,
            serde_json::json!({"w": {"type": "time", "duration": "1s"}, "a": 1, "b": 2})
        );
    }

    #[test]
    fn finds_the_line_of_a_dotted_field() {
        let text = "[client]\ndeadline = \"1s\"\n\n[client.retry.backoff]\nmax_delay = \"2s\"\n";
        assert_eq!(line_of_field(text, "client.deadline"), Some(2));
        assert_eq!(
            line_of_field(text, "client.retry.backoff.max_delay"),
            Some(5)
        );
        assert_eq!(line_of_field(text, "client.attempt_timeout"), None);
        let arrays = "[server.idempotency]\nttl = \"1h\"\nstream_through = [\"a\", \"*\"]\n";
        assert_eq!(
            line_of_field(arrays, "server.idempotency.stream_through[1]"),
            Some(3)
        );
        assert_eq!(key_on_line(text, 5).as_deref(), Some("max_delay"));
        assert_eq!(key_on_line("  \"ttl\": \"1x\"", 1).as_deref(), Some("ttl"));
    }
}
