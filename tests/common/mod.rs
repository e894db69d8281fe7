//! Real `chunkserver run` processes on loopback for the integration tests.
#![allow(dead_code)] // each test binary uses part of it

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub fn free_ports(count: usize) -> Vec<u16> {
    dataplane::server::free_ports(count).expect("free loopback ports")
}

pub fn write_config(dir: &Path, id: usize, ports: &[u16]) -> PathBuf {
    let nodes: Vec<String> = (0..ports.len() / 2)
        .map(|n| {
            format!(
                "{{ id = {}, peer = \"tcp://127.0.0.1:{}\", client = [\"tcp://127.0.0.1:{}\"], shards = 1 }}",
                n + 1,
                ports[2 * n],
                ports[2 * n + 1]
            )
        })
        .collect();
    let text = format!(
        r#"[node]
id = {id}
cores = [0]
data_dir = "{dir}/node{id}"

[listen]
peer = "tcp://127.0.0.1:{peer}"
client = ["tcp://127.0.0.1:{client}"]

[cluster]
nodes = [{nodes}]

[[devices]]
backend = "uring"
path = "chunks.img"
size = "96MiB"

[storage]
chunk_size = "1MiB"
wal_size_per_shard = "16MiB"

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
