//! `chunkserver demo`, as the README runs it: three replicas on loopback, a region written and
//! read back, a short benchmark, a clean stop.

use std::process::Command;

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
