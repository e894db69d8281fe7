//! The operator's path, all real processes: three `chunkserver run`, `chunkctl volume create`
//! putting a volume in the volume table, `chunkserver nbd` serving it by name, and qemu-io
//! writing and reading it back through NBD — then a second `chunkserver nbd`, opening the
//! volume by name again, reads the same bytes; with every node gone its failed read is
//! logged (volume, offset, copyset, cause) and counted in its metrics.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_ports, start, write_config, Cluster};

#[test]
fn qemu_io_reads_back_what_it_wrote_to_a_volume_served_by_chunkserver_nbd() {
    if Command::new("qemu-io").arg("--version").output().is_err() {
        eprintln!("SKIPPED: qemu-io is not installed (Debian package qemu-utils)");
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(8);
    let configs: Vec<_> = (1..=3)
        .map(|id| write_config(dir.path(), id, &ports))
        .collect();
    let mut cluster = Cluster {
        children: configs.iter().map(|c| Some(start(c))).collect(),
    };
    let started = Instant::now();
    let created = loop {
        let output = Command::new(env!("CARGO_BIN_EXE_chunkctl"))
            .arg("--config")
            .arg(&configs[0])
            .args([
                "volume",
                "create",
                "--name",
                "vol0",
                "--size",
                "8MiB",
                "--copyset",
                "3",
            ])
            .output()
            .expect("run chunkctl");
        // The nodes may still be starting: chunkctl gives up after its deadline; try again.
        if output.status.success() || started.elapsed() > Duration::from_secs(30) {
            break output;
        }
    };
    let text = String::from_utf8_lossy(&created.stdout).into_owned()
        + &String::from_utf8_lossy(&created.stderr);
    assert!(created.status.success(), "{text}");
    assert!(
        text.starts_with("volume vol0: 8388608 bytes on copyset 3"),
        "{text}"
    );

    let nbd_addr = format!("127.0.0.1:{}", ports[6]);
    let serve = || {
        Command::new(env!("CARGO_BIN_EXE_chunkserver"))
            .args(["nbd", "--config"])
            .arg(&configs[0])
            .args(["--listen", &nbd_addr, "--volume", "vol0"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start chunkserver nbd")
    };
    let qemu_io = |commands: &[&str]| {
        let uri = format!("nbd://{nbd_addr}/vol0");
        let started = Instant::now();
        loop {
            let mut args = vec!["-f", "raw", &uri];
            for command in commands {
                args.extend(["-c", command]);
            }
            let output = Command::new("qemu-io")
                .args(&args)
                .output()
                .expect("run qemu-io");
            if output.status.success() || started.elapsed() > Duration::from_secs(30) {
                break String::from_utf8_lossy(&output.stdout).into_owned()
                    + &String::from_utf8_lossy(&output.stderr)
                    + if output.status.success() {
                        ""
                    } else {
                        "\nqemu-io failed"
                    };
            }
            // The export comes up once the volume is open; until then the connection is
            // refused.
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    cluster.children.push(Some(serve()));
    let text = qemu_io(&["write -P 0xab 0 1M", "read -P 0xab 0 1M"]);
    assert!(!text.contains("qemu-io failed"), "{text}");
    assert!(text.contains("read 1048576/1048576"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");

    // Another export process opens the volume by name from the table: the same bytes. This
    // one logs to a file and serves its metrics.
    if let Some(mut nbd) = cluster.children.pop().flatten() {
        nbd.kill().expect("stop the first export");
        nbd.wait().expect("reap");
    }
    let log = dir.path().join("nbd.log");
    let metrics_port = ports[7];
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let second = Command::new(env!("CARGO_BIN_EXE_chunkserver"))
        .args(["nbd", "--config"])
        .arg(&configs[0])
        .args([
            "--listen",
            &nbd_addr,
            "--volume",
            "vol0",
            "--metrics",
            &metrics_addr,
            // The requests below, with every node gone, fail after this (default 60 s).
            "--io-timeout",
            "5",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start chunkserver nbd");
    cluster.children.push(Some(second));
    let text = qemu_io(&["read -P 0xab 0 1M"]);
    assert!(!text.contains("qemu-io failed"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");

    // Issue 24: with every node gone, a read fails (EIO to the client after `--io-timeout`,
    // and no sooner than that), the export logs it once with the volume, offset, copyset and cause, and
    // counts it.
    for node in cluster.children.iter_mut().take(3) {
        if let Some(mut child) = node.take() {
            child.kill().expect("kill a node");
            child.wait().expect("reap");
        }
    }
    let asked = std::time::Instant::now();
    let failed = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd://{nbd_addr}/vol0"),
            "-c",
            "read 0 4k",
        ])
        .output()
        .expect("run qemu-io");
    let said = String::from_utf8_lossy(&failed.stdout).into_owned()
        + &String::from_utf8_lossy(&failed.stderr);
    assert!(
        said.contains("Input/output error") || !failed.status.success(),
        "a read with no node up succeeded: {said}"
    );
    assert!(
        asked.elapsed() >= std::time::Duration::from_secs(5),
        "the read failed after {:?}, before --io-timeout 5",
        asked.elapsed()
    );
    let logged = std::fs::read_to_string(&log).expect("nbd log");
    let line = logged
        .lines()
        .find(|l| l.contains("volume request failed"))
        .unwrap_or_else(|| panic!("no error line in the export's log: {logged}"));
    for field in ["volume=vol0", "offset=0", "copyset=3", "cause="] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    assert!(
        !line.contains('\u{1b}'),
        "colour codes in a log file: {line:?}"
    );
    let metrics = common::http_get(metrics_port, "/metrics");
    let count = |result: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("chunkserver_nbd_requests_total")
                    && l.contains("op=\"read\"")
                    && l.contains(&format!("result=\"{result}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(count("ok") >= 1, "{metrics}");
    assert!(count("error") >= 1, "{metrics}");
}
