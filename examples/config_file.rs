//! Loads a stack config from a file, builds the client stack, and shows what a bad file
//! says.
//!
//! `cargo run --example config_file [path]` (default `examples/config/stack.toml`;
//! `stack.yaml` and `stack.json` beside it say the same thing).

use postbox::BoxError;
use postbox::config::{Format, StackConfig};
use postbox::http::reqwest::ReqwestService;
use std::path::PathBuf;
use tower::ServiceBuilder;

fn main() -> Result<(), BoxError> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/config");
    let path = std::env::args_os()
        .nth(1)
        .map_or_else(|| dir.join("stack.toml"), PathBuf::from);

    // Load, apply the presets, validate across layers.
    let config = StackConfig::load(&path)?;
    // Presets applied and defaults filled in, as TOML the loader reads back.
    println!("== effective config of {}\n{config}", path.display());

    // The same stack in YAML and JSON.
    for other in ["stack.yaml", "stack.json"] {
        let text = std::fs::read_to_string(dir.join(other))?;
        let same = StackConfig::load(dir.join(other))? == config;
        println!(
            "== {other} (gives the same config: {same})\n{}\n",
            text.trim()
        );
    }

    // Build the client stack around a reqwest client (no request is sent here).
    let stack = config.client.layer()?;
    let _client = ServiceBuilder::new()
        .layer(stack.clone())
        .service(ReqwestService::new(reqwest::Client::new()));
    println!(
        "client stack built: {} bulkhead permits free for each host, {} retries at most",
        stack.available_permits(&http::uri::Authority::from_static("orders.internal")),
        stack.retry().policy().max_retries()
    );
    let _server = config.server.layer()?;
    println!("server stack built\n");

    // What bad files say.
    println!("== errors");
    match StackConfig::load(dir.join("bad_cross_layer.toml")) {
        Ok(_) => println!("bad_cross_layer.toml was accepted?!"),
        Err(e) => println!("{e}"),
    }
    let bad = [
        (
            "[client]\nattempt_timeout = \"250 parsecs\"\n",
            Format::Toml,
        ),
        ("client:\n  retry:\n    max_retry: 2\n", Format::Yaml),
        (
            "{\n  \"client\": { \"deadline\": \"1s\", \"attempt_timeout\": \"2s\" }\n}",
            Format::Json,
        ),
    ];
    for (text, format) in bad {
        match StackConfig::from_str(text, format) {
            Ok(_) => println!("{format}: accepted?!"),
            Err(e) => println!("{format}: {e}"),
        }
    }
    Ok(())
}
