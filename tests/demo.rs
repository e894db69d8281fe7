//! `chunkserver demo`, as the README runs it: three replicas on loopback, a region written and
//! read back, a short benchmark, a clean stop.

use std::process::Command;
use std::sync::Mutex;

/// The demo's ports are fixed: the tests that use them take turns.
static PORTS: Mutex<()> = Mutex::new(());

fn demo(backend: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_chunkserver"))
        .args(["demo", "--seconds", "1", "--backend", backend])
        .output()
        .expect("run chunkserver demo");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn the_demo_replicates_reads_back_benchmarks_and_stops_cleanly() {
    // Both backends in one test: the demo's ports are fixed, so the runs must not overlap.
    let _ports = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    for backend in ["mem", "uring"] {
        let out = demo(backend);
        assert!(out.contains("wrote and read back 8 MiB"), "{out}");
        for phase in ["4k randwrite QD1", "4k randwrite QD32", "4k randread QD32"] {
            let line = out
                .lines()
                .find(|l| l.contains(phase))
                .unwrap_or_else(|| panic!("{out}"));
            let ops: u64 = line
                .split_whitespace()
                .nth(4)
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no op count in {line:?}"));
            assert!(ops > 0, "{line}");
        }
        assert!(out.contains("stopped cleanly"), "{out}");
    }
}

/// The demo ends by saying what to try next; those commands work as printed (run from the
/// project's root, as the README has it): three `chunkserver run` from the demo's
/// configurations, the metadata copyset created by its name `meta`, a striped volume, its NBD
/// export read by qemu-img, and `chunkctl status` naming the metadata copyset `meta`.
#[test]
fn the_next_steps_the_demo_prints_work_as_printed() {
    let _ports = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let out = demo("mem");
    let steps: Vec<Vec<String>> = out
        .lines()
        .skip_while(|l| !l.starts_with("next:"))
        .skip(1)
        .filter_map(|l| l.split('#').next())
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|words| !words.is_empty())
        .collect();
    assert!(steps.len() >= 5, "no next steps in: {out}");
    let root = env!("CARGO_MANIFEST_DIR");
    let binary = |name: &str| match name {
        "chunkserver" => env!("CARGO_BIN_EXE_chunkserver").to_string(),
        "chunkctl" => env!("CARGO_BIN_EXE_chunkctl").to_string(),
        other => other.to_string(),
    };
    let mut children = Children(Vec::new());
    let mut run = |words: &[String], background: bool| {
        let mut command = Command::new(binary(&words[0]));
        command.args(&words[1..]).current_dir(root);
        if background {
            command
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            children.0.push(command.spawn().expect("start"));
            return None;
        }
        Some(command.output().expect("run"))
    };
    let mut status_text = String::new();
    for words in &steps {
        let line = words.join(" ");
        match (words[0].as_str(), words.get(1).map(String::as_str)) {
            ("chunkserver", Some("run")) => {
                for node in ["node1", "node2", "node3"] {
                    let config = line.replace("node1", node);
                    let node_words: Vec<String> =
                        config.split_whitespace().map(str::to_string).collect();
                    run(&node_words, true);
                }
            }
            ("chunkserver", Some("nbd")) => {
                run(words, true);
            }
            ("qemu-img", _) if Command::new("qemu-img").arg("--version").output().is_err() => {
                eprintln!("SKIPPED {line}: qemu-img is not installed (Debian qemu-utils)");
            }
            _ => {
                // Retried while the nodes elect and the export starts.
                let began = std::time::Instant::now();
                let output = loop {
                    let output = run(words, false).expect("output");
                    if output.status.success()
                        || began.elapsed() > std::time::Duration::from_secs(30)
                    {
                        break output;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(300));
                };
                let text = String::from_utf8_lossy(&output.stdout).into_owned()
                    + &String::from_utf8_lossy(&output.stderr);
                assert!(output.status.success(), "`{line}` failed: {text}");
                if line.contains(" status") {
                    status_text = text;
                }
            }
        }
    }
    drop(children);
    assert!(
        status_text.contains("meta") && !status_text.contains("18446744073709551614"),
        "chunkctl status does not name the metadata copyset: {status_text}"
    );
}

/// Processes killed when dropped, a failed assertion included.
struct Children(Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
