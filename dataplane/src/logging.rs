//! Logging through `tracing`: the level comes from the configuration, `RUST_LOG` overrides it.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is the configured level; `json` selects JSON lines.
/// A second call (tests, the demo's in-process nodes) leaves the first subscriber in place.
pub fn init(level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // An error here only means a subscriber is already installed, which is fine.
    drop(result);
}
