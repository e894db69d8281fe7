//! Real `chunkserver run` processes on loopback for the integration tests.
#![allow(dead_code)] // each test binary uses part of it

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub fn free_ports(count: usize) -> Vec<u16> {
    dataplane::server::free_ports(count).expect("free loopback ports")
}

/// The configuration file of node `id` (1-based) of a loopback cluster of `ports.len() / 2`
/// nodes (each a peer and a client port), with a 96 MiB device and a 16 MiB WAL ring.
pub fn write_config(dir: &Path, id: usize, ports: &[u16]) -> PathBuf {
    let hosts = vec!["127.0.0.1".to_string(); ports.len() / 2];
    write_config_on_hosts(dir, id, &hosts, ports, "96MiB", "16MiB")
}

pub fn start(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_chunkserver"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start chunkserver")
}

pub struct Cluster {
    pub children: Vec<Option<Child>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The configuration file of node `id` (1-based) of a cluster whose node `n` listens on
/// `hosts[n - 1]` (the fault suite puts each node in its own network namespace), with a device
/// of `device_size`, a WAL ring of `wal_size`, and test timings (10 ms ticks, 200 ms election
/// timeout). Logs go to stderr at `warn`.
pub fn write_config_on_hosts(
    dir: &Path,
    id: usize,
    hosts: &[String],
    ports: &[u16],
    device_size: &str,
    wal_size: &str,
) -> PathBuf {
    let nodes: Vec<String> = (0..hosts.len())
        .map(|n| {
            format!(
                "{{ id = {}, peer = \"tcp://{host}:{}\", client = [\"tcp://{host}:{}\"], shards = 1 }}",
                n + 1,
                ports[2 * n],
                ports[2 * n + 1],
                host = hosts[n],
            )
        })
        .collect();
    let host = &hosts[id - 1];
    let text = format!(
        r#"[node]
id = {id}
cores = [0]
data_dir = "{dir}/node{id}"

[listen]
peer = "tcp://{host}:{peer}"
client = ["tcp://{host}:{client}"]

[cluster]
nodes = [{nodes}]

[[devices]]
backend = "uring"
path = "chunks.img"
size = "{device_size}"

[storage]
chunk_size = "1MiB"
wal_size_per_shard = "{wal_size}"

[raft]
tick_ms = 10
election_timeout_ms = 200
heartbeat_interval_ms = 30
lease_ms = 150

[log]
level = "warn"
"#,
        dir = dir.display(),
        peer = ports[2 * (id - 1)],
        client = ports[2 * (id - 1) + 1],
        nodes = nodes.join(", "),
    );
    let path = dir.join(format!("node{id}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}
