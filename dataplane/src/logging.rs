//! Logging through `tracing`: the level comes from the configuration, `RUST_LOG` overrides it.
//! Text lines carry colour only when stderr is a terminal (and `NO_COLOR` is not set): a log
//! written to a file or a pipe is plain text; `log.format = "json"` gives JSON lines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Whether text log lines are coloured: only on a terminal, and never with `NO_COLOR` set to
/// anything but the empty string (<https://no-color.org>).
pub fn colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.map_or(true, |v| v.is_empty())
}

/// Installs the global subscriber. `level` is the configured level; `json` selects JSON lines.
/// A second call (tests, the demo's in-process nodes) leaves the first subscriber in place.
pub fn init(level: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // An error here only means a subscriber is already installed, which is fine.
    drop(result);
}

#[cfg(test)]
mod tests {
    use super::colour;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None), "a file or a pipe gets plain text");
    }
}
