//! The operator's path, all real processes: three `chunkserver run`, one `chunkserver nbd`
//! serving a volume, and qemu-io writing and reading it back through NBD.

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
    let nbd_addr = format!("127.0.0.1:{}", ports[6]);
    let nbd = Command::new(env!("CARGO_BIN_EXE_chunkserver"))
        .args(["nbd", "--config"])
        .arg(&configs[0])
        .args(["--listen", &nbd_addr, "--volume", "vol0:3:8MiB"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start chunkserver nbd");
    cluster.children.push(Some(nbd));

    let uri = format!("nbd://{nbd_addr}/vol0");
    let started = Instant::now();
    let output = loop {
        let output = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                &uri,
                "-c",
                "write -P 0xab 0 1M",
                "-c",
                "read -P 0xab 0 1M",
            ])
            .output()
            .expect("run qemu-io");
        if output.status.success() || started.elapsed() > Duration::from_secs(30) {
            break output;
        }
        // The export comes up once its copyset exists; until then the connection is refused.
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("read 1048576/1048576"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
}
