//! Scrub with real processes at the sizes users run (issue 22): three `chunkserver run` with
//! 16 MiB chunks and 256 MiB WALs, a volume written through `chunkserver nbd`; bytes flipped in
//! one node's device file are named by `chunkctl scrub` (exit 1) and repaired from the
//! majority by `chunkctl scrub --repair` while fio keeps writing and verifying elsewhere in the
//! volume; afterwards every copyset scrubs clean and the volume reads back right.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    chunkctl, chunkctl_until_ok, free_ports, start, text, wait_for_port, write_config_sized,
    Cluster, Sizes,
};

const PAGE: usize = 4096;

/// Flips a byte in the last page-aligned page of `image` that is all `fill` (chunk slots lie
/// after the WAL ring, so that is a chunk's page, not a WAL record's).
fn flip_a_page(image: &std::path::Path, fill: u8) -> u64 {
    let bytes = std::fs::read(image).expect("read the device file");
    let at = bytes
        .chunks_exact(PAGE)
        .enumerate()
        .rev()
        .find(|(_, p)| p.iter().all(|b| *b == fill))
        .map(|(i, _)| i * PAGE)
        .expect("a written page in the device file");
    // One byte written in place: the node has the file open.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .expect("open the device file");
    std::os::unix::fs::FileExt::write_at(&file, &[fill ^ 0x01], (at + 7) as u64)
        .expect("flip a byte");
    at as u64
}

#[test]
fn chunkctl_scrub_names_a_flipped_page_and_repairs_it_while_fio_writes() {
    for tool in ["qemu-io", "fio"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("SKIPPED: {tool} is not installed (Debian packages qemu-utils, fio)");
            return;
        }
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(8);
    let hosts = vec!["127.0.0.1".to_string(); 3];
    let sizes = Sizes {
        device: "1GiB",
        wal: "256MiB",
        chunk: "16MiB",
    };
    let configs: Vec<_> = (1..=3)
        .map(|id| write_config_sized(dir.path(), id, &hosts, &ports[..6], &sizes, 1))
        .collect();
    let mut cluster = Cluster {
        children: configs.iter().map(|c| Some(start(c))).collect(),
    };
    let created = chunkctl_until_ok(
        &configs[0],
        &[
            "volume",
            "create",
            "--name",
            "v",
            "--size",
            "64MiB",
            "--copyset",
            "5",
        ],
        Duration::from_secs(30),
    );
    assert!(created.status.success(), "{}", text(&created));
    let nbd_addr = format!("127.0.0.1:{}", ports[6]);
    let mut nbd = Command::new(env!("CARGO_BIN_EXE_chunkserver"))
        .args(["nbd", "--config"])
        .arg(&configs[0])
        .args(["--listen", &nbd_addr, "--volume", "v"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start chunkserver nbd");
    wait_for_port(&nbd_addr, &mut nbd);
    cluster.children.push(Some(nbd));
    let uri = format!("nbd://{nbd_addr}/v");
    let qemu_io = |command: &str| {
        let output = Command::new("qemu-io")
            .args(["-f", "raw", &uri, "-c", command])
            .output()
            .expect("run qemu-io");
        let said = text(&output);
        assert!(
            output.status.success() && !said.contains("failed"),
            "qemu-io {command}: {said}"
        );
    };
    // The first 32 MiB (two chunks) filled with one byte.
    qemu_io("write -P 0x5a 0 32M");

    let clean = chunkctl(&configs[0], &["scrub", "--copyset", "5"]);
    assert!(clean.status.success(), "{}", text(&clean));
    assert!(text(&clean).contains("replicas agree"), "{}", text(&clean));

    let flipped = flip_a_page(&dir.path().join("node2/chunks.img"), 0x5a);
    assert!(
        flipped > 256 << 20,
        "the page is past the WAL ring: {flipped}"
    );
    let found = chunkctl(&configs[0], &["--json", "scrub", "--copyset", "5"]);
    assert_eq!(found.status.code(), Some(1), "{}", text(&found));
    let report: serde_json::Value = serde_json::from_slice(&found.stdout).expect("one JSON object");
    let bad = &report["scrubbed"][0]["bad_pages"];
    assert_eq!(bad.as_array().map(Vec::len), Some(1), "{report}");
    assert_eq!(bad[0]["node"], 2, "{report}");
    assert_eq!(bad[0]["repaired"], false, "{report}");

    // The repair runs while fio writes and verifies the volume's other half.
    let fio = Command::new("fio")
        .args([
            "--name=beside",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--offset=32m",
            "--size=32m",
            "--time_based",
            "--runtime=8",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randseed=22",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio");
    let repaired = chunkctl(&configs[0], &["scrub", "--copyset", "5", "--repair"]);
    let fio = fio.wait_with_output().expect("fio");
    assert!(
        fio.status.success(),
        "fio beside the repair: {}",
        text(&fio)
    );
    assert!(repaired.status.success(), "{}", text(&repaired));
    assert!(
        text(&repaired).contains("(repaired)"),
        "{}",
        text(&repaired)
    );

    let after = chunkctl(&configs[0], &["scrub"]);
    assert!(after.status.success(), "{}", text(&after));
    assert!(
        text(&after).contains("copyset meta") && text(&after).contains("copyset 5"),
        "every copyset scrubbed: {}",
        text(&after)
    );
    qemu_io("read -P 0x5a 0 32M");
}
