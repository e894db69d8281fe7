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

/// Runs `chunkctl --config CONFIG ARGS…` and gives its output.
pub fn chunkctl(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chunkctl"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run chunkctl")
}

/// Runs `chunkctl --config CONFIG ARGS…` until it succeeds or `within` passes (the nodes may
/// still be starting: chunkctl gives up after its own deadline), and gives the last output.
pub fn chunkctl_until_ok(
    config: &Path,
    args: &[&str],
    within: std::time::Duration,
) -> std::process::Output {
    let began = std::time::Instant::now();
    loop {
        let output = chunkctl(config, args);
        if output.status.success() || began.elapsed() > within {
            return output;
        }
    }
}

/// A process's stdout and stderr, as text.
pub fn text(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
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
    write_config_sharded(dir, id, hosts, ports, device_size, wal_size, 1)
}

/// [`write_config_on_hosts`] with `shards` shards per node (on cores 0..shards).
pub fn write_config_sharded(
    dir: &Path,
    id: usize,
    hosts: &[String],
    ports: &[u16],
    device_size: &str,
    wal_size: &str,
    shards: u32,
) -> PathBuf {
    let sizes = Sizes {
        device: device_size,
        wal: wal_size,
        chunk: "1MiB",
    };
    write_config_sized(dir, id, hosts, ports, &sizes, shards)
}

/// The sizes a test configuration sets.
pub struct Sizes<'a> {
    /// The device (a sparse file).
    pub device: &'a str,
    /// The WAL ring of each shard.
    pub wal: &'a str,
    /// A chunk.
    pub chunk: &'a str,
}

/// [`write_config_sharded`] with every size chosen.
pub fn write_config_sized(
    dir: &Path,
    id: usize,
    hosts: &[String],
    ports: &[u16],
    sizes: &Sizes<'_>,
    shards: u32,
) -> PathBuf {
    let (device_size, wal_size, chunk_size) = (sizes.device, sizes.wal, sizes.chunk);
    let cores: Vec<String> = (0..shards).map(|c| c.to_string()).collect();
    let cores = cores.join(", ");
    let nodes: Vec<String> = (0..hosts.len())
        .map(|n| {
            format!(
                "{{ id = {}, peer = \"tcp://{host}:{}\", client = [\"tcp://{host}:{}\"], shards = {shards} }}",
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
cores = [{cores}]
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
chunk_size = "{chunk_size}"
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

/// The body of `GET path` from an HTTP server on 127.0.0.1:`port` (the metrics endpoint).
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// Waits until `addr` accepts connections (a `chunkserver nbd` serves) or 60 s pass; fails
/// at once if `child` exits first.
pub fn wait_for_port(addr: &str, child: &mut Child) {
    let began = std::time::Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the process serving {addr} exited: {status}");
        }
        assert!(
            began.elapsed() < std::time::Duration::from_secs(60),
            "nothing serves {addr} after 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
