//! The operator's path, all real processes: three `chunkserver run`, `chunkctl volume create`
//! putting a volume in the volume table, `chunkserver nbd` serving it by name, and qemu-io
//! writing and reading it back through NBD — then a second `chunkserver nbd`, opening the
//! volume by name again, reads the same bytes.

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
    let ports = free_ports(7);
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

    // Another export process opens the volume by name from the table: the same bytes.
    if let Some(mut nbd) = cluster.children.pop().flatten() {
        nbd.kill().expect("stop the first export");
        nbd.wait().expect("reap");
    }
    cluster.children.push(Some(serve()));
    let text = qemu_io(&["read -P 0xab 0 1M"]);
    assert!(!text.contains("qemu-io failed"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
}
