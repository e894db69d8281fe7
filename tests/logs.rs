//! What an operator finds in a log file (issue 24): `chunkserver run` writing to a file (not a
//! terminal) logs plain text without colour codes, and `log.format = "json"` one JSON object
//! per line.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_ports, write_config};

/// Runs node 1 of `config` with stderr to `log` until it says its shard serves; gives the log.
fn log_of_a_start(config: &Path, log: &Path) -> String {
    let file = std::fs::File::create(log).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chunkserver"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("start chunkserver");
    let began = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("shard serving") || began.elapsed() > Duration::from_secs(30) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains("shard serving"),
        "no start in the log: {text}"
    );
    text
}

#[test]
fn a_log_file_is_plain_text_and_json_when_configured() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let config = write_config(dir.path(), 1, &ports);

    let text = log_of_a_start(&config, &dir.path().join("text.log"));
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file: {text:?}"
    );
    assert!(text.lines().any(|l| l.contains(" INFO ")), "{text}");

    let toml = std::fs::read_to_string(&config).expect("config");
    assert!(toml.contains("[log]\n"), "{toml}");
    let toml = toml.replace("[log]\n", "[log]\nformat = \"json\"\n");
    std::fs::write(&config, toml).expect("config");
    let json = log_of_a_start(&config, &dir.path().join("json.log"));
    for line in json.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
    }
}
