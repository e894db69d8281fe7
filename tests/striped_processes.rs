//! Issue 18's acceptance, with real processes: three `chunkserver run` (two shards each, on
//! 127.0.0.1, .2 and .3 so that placement sees three hosts; 16 MiB chunks, 256 MiB WAL rings),
//! `chunkctl volume create --name v --size 8GiB` with no copyset — the pool is planned and
//! created over the nodes — then `chunkserver nbd` serving it and unmodified fio
//! (`--ioengine=nbd`, `verify=crc32c`) writing all over the 8 GiB and verifying what it wrote.
//! The pool's copysets have their leaders on every node, the volume's chunks sit on at least
//! 8 of them, and a second export, opened by name on another node's configuration, reads
//! back what fio wrote (`fio --verify_only`).

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    chunkctl, free_ports, start, text, wait_for_port, write_config_sized, Cluster, Sizes,
};

const HOSTS: [&str; 3] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"];

/// fio's spread write (or, with `--verify_only`, its check of what the same job wrote).
fn fio(uri: &str, extra: &[&str]) -> Output {
    Command::new("fio")
        .args([
            "--name=spread",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=8",
            "--size=8g",
            "--io_size=384m",
            "--randseed=18",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .args(extra)
        .output()
        .expect("run fio")
}

#[test]
fn an_8_gib_volume_spreads_over_the_pool_and_fio_verifies_it_through_nbd() {
    for tool in ["fio"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("SKIPPED: {tool} is not installed (Debian package fio)");
            return;
        }
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(8);
    let hosts: Vec<String> = HOSTS.iter().map(|h| h.to_string()).collect();
    let sizes = Sizes {
        device: "16GiB",
        wal: "256MiB",
        chunk: "16MiB",
    };
    let configs: Vec<_> = (1..=3)
        .map(|id| write_config_sized(dir.path(), id, &hosts, &ports, &sizes, 2))
        .collect();
    let mut cluster = Cluster {
        children: configs.iter().map(|c| Some(start(c))).collect(),
    };

    let started = Instant::now();
    // The nodes may still be starting; chunkctl gives up after its deadline: again.
    let created = common::chunkctl_until_ok(
        &configs[0],
        &[
            "--json", "volume", "create", "--name", "v", "--size", "8GiB",
        ],
        Duration::from_secs(60),
    );
    assert!(created.status.success(), "{}", text(&created));
    let volume: serde_json::Value =
        serde_json::from_slice(&created.stdout).expect("volume create prints JSON");
    assert_eq!(volume["layout"], "striped", "{volume}");
    assert_eq!(volume["segments"], 8, "{volume}");
    println!(
        "created in {:.1} s: {volume}",
        started.elapsed().as_secs_f64()
    );

    // Leadership transfers finish within an election timeout: look until every node leads.
    let looked = Instant::now();
    let pool = loop {
        let pool = chunkctl(&configs[0], &["--json", "pool"]);
        assert!(pool.status.success(), "{}", text(&pool));
        let pool: serde_json::Value = serde_json::from_slice(&pool.stdout).expect("pool JSON");
        let pool = pool["pool"].as_array().expect("a list").clone();
        let leaders: BTreeSet<u64> = pool.iter().filter_map(|c| c["leader"].as_u64()).collect();
        if leaders == BTreeSet::from([1, 2, 3]) {
            break pool;
        }
        assert!(
            looked.elapsed() < Duration::from_secs(15),
            "leaders not on every node: {pool:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(pool.len() >= 8, "{pool:?}");
    for copyset in &pool {
        assert_eq!(copyset["state"], "ready", "{copyset}");
        let peers: BTreeSet<u64> = copyset["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .collect();
        assert_eq!(peers.len(), 3, "three distinct nodes: {copyset}");
    }

    let nbd_addr = format!("127.0.0.1:{}", ports[6]);
    let mut nbd = Command::new(env!("CARGO_BIN_EXE_chunkserver"))
        .args(["nbd", "--config"])
        .arg(&configs[0])
        .args(["--listen", &nbd_addr, "--volume", "v"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start chunkserver nbd");
    wait_for_port(&nbd_addr, &mut nbd);
    cluster.children.push(Some(nbd)); // stopped with the cluster, whatever happens
    let uri = format!("nbd://{nbd_addr}/v");
    // 64 KiB random writes over the whole 8 GiB (every segment, most chunks), 384 MiB in all,
    // each block checked by its crc32c afterwards.
    let began = Instant::now();
    let written = fio(&uri, &[]);
    assert!(written.status.success(), "fio: {}", text(&written));
    println!(
        "fio wrote and verified 384 MiB in {:.1} s",
        began.elapsed().as_secs_f64()
    );

    let map = chunkctl(&configs[0], &["--json", "volume", "map", "--name", "v"]);
    assert!(map.status.success(), "{}", text(&map));
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).expect("map JSON");
    assert_eq!(map["allocated"].as_array().map(Vec::len), Some(8), "{map}");
    let spread = map["chunks_per_copyset"].as_object().map_or(0, |m| m.len());
    assert!(spread >= 8, "chunks on {spread} copysets: {map}");

    // A second export opens the volume by name; fio reads back and checks what it wrote.
    let second_addr = format!("127.0.0.1:{}", ports[7]);
    let mut second = Command::new(env!("CARGO_BIN_EXE_chunkserver"))
        .args(["nbd", "--config"])
        .arg(&configs[1])
        .args(["--listen", &second_addr, "--volume", "v"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start a second chunkserver nbd");
    wait_for_port(&second_addr, &mut second);
    cluster.children.push(Some(second));
    let verified = fio(&format!("nbd://{second_addr}/v"), &["--verify_only"]);
    assert!(
        verified.status.success(),
        "fio --verify_only: {}",
        text(&verified)
    );
    drop(cluster);
}
