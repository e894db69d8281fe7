//! `chunkserver check-config` as an operator meets it: exit status and a one-line message
//! naming the key, for each kind of mistake.

use std::path::Path;
use std::process::Command;

const GOOD: &str = r#"
[node]
id = 1
cores = [0]

[listen]
peer = "tcp://127.0.0.1:7100"
client = ["tcp://127.0.0.1:7200"]

[[devices]]
backend = "mem"
size = "1GiB"
"#;

/// Runs check-config on `text`; returns (success, stdout, stderr).
fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("node.toml");
    std::fs::write(&file, text).expect("write the config");
    let output = Command::new(env!("CARGO_BIN_EXE_chunkserver"))
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("run chunkserver");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_refused(text: &str, key: &str) {
    let (ok, _, stderr) = check(text);
    assert!(!ok, "accepted a config that should fail on `{key}`");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    assert!(
        lines[0].contains(key),
        "message does not name `{key}`: {stderr}"
    );
    assert!(
        lines[0].contains("node.toml"),
        "message does not name the file: {stderr}"
    );
}

#[test]
fn a_valid_file_passes() {
    let (ok, stdout, stderr) = check(GOOD);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
}

#[test]
fn an_unknown_key_fails_naming_it() {
    assert_refused(
        &GOOD.replace("id = 1", "id = 1\ncolour = \"blue\""),
        "colour",
    );
}

#[test]
fn a_core_that_does_not_exist_fails() {
    assert_refused(&GOOD.replace("cores = [0]", "cores = [4095]"), "node.cores");
}

#[test]
fn a_bad_address_fails() {
    assert_refused(
        &GOOD.replace("tcp://127.0.0.1:7100", "tcp://127.0.0.1:notaport"),
        "listen.peer",
    );
}

#[test]
fn a_size_not_a_multiple_of_the_page_size_fails() {
    assert_refused(
        &format!("{GOOD}\n[storage]\nchunk_size = 5000\n"),
        "storage.chunk_size",
    );
    assert_refused(&GOOD.replace("\"1GiB\"", "1073741000"), "devices[0].size");
}

#[test]
fn a_missing_file_fails() {
    let output = Command::new(env!("CARGO_BIN_EXE_chunkserver"))
        .args(["check-config", "/nonexistent/chunkserver.toml"])
        .output()
        .expect("run chunkserver");
    assert!(!output.status.success());
}

#[test]
fn the_shipped_examples_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in [
        "numa0.toml",
        "numa1.toml",
        "demo/node1.toml",
        "demo/node2.toml",
        "demo/node3.toml",
    ] {
        let path = root.join("configs").join(name);
        let text = std::fs::read_to_string(&path).expect("read example");
        dataplane::config::Config::parse(&path, &text)
            .unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
    }
}

#[test]
fn version_names_the_backends() {
    let output = Command::new(env!("CARGO_BIN_EXE_chunkserver"))
        .arg("--version")
        .output()
        .expect("run chunkserver");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("uring mem softverbs tcp"), "{stdout}");
    assert!(stdout.contains("commit"), "{stdout}");
}
