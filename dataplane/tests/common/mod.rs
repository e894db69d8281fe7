//! The in-process cluster used by the integration tests: three chunkservers on loopback,
//! each on its own executor thread, stopped by its own signal.
#![allow(dead_code)] // each test binary uses part of it

use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use dataplane::client::{Client, ClientConfig, NodeAddress};
use dataplane::config::{Config, NetSection};
use dataplane::server::run_node;
use dataplane::shard::ShutdownSignal;
use glommio::{LocalExecutorBuilder, Placement};

pub struct Node {
    shutdown: ShutdownSignal,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Node {
    pub fn start(config: Config) -> Node {
        Node::start_on(config, vec![0])
    }

    /// Starts the node with one shard per entry of `cores`.
    pub fn start_on(config: Config, cores: Vec<u32>) -> Node {
        // The nodes' logs, when asked for with RUST_LOG (off otherwise: test output stays short).
        if std::env::var_os("RUST_LOG").is_some() {
            dataplane::logging::init("info", false);
        }
        let shutdown = ShutdownSignal::new();
        let signal = shutdown.clone();
        let thread = std::thread::spawn(move || {
            run_node(&config, &cores, &signal).map_err(|e| e.to_string())
        });
        Node {
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn stop(&mut self) {
        self.shutdown.raise();
        if let Some(thread) = self.thread.take() {
            let result = thread.join().expect("node thread");
            result.expect("node ran cleanly");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.raise();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub fn free_ports(count: usize) -> Vec<u16> {
    dataplane::server::free_ports(count).expect("free loopback ports")
}

/// The configuration of node `id` (1-based) of a three-node cluster over TCP.
pub fn config(id: u32, ports: &[u16], dir: &Path, backend: &str) -> Config {
    config_over(id, ports, dir, backend, "tcp")
}

/// The same, with every listener on transport `scheme` (`tcp`, `softrdma`).
pub fn config_over(id: u32, ports: &[u16], dir: &Path, backend: &str, scheme: &str) -> Config {
    config_of_cluster(id, 3, ports, dir, backend, scheme)
}

/// The configuration of node `id` of a cluster of `count` nodes (two ports each in `ports`).
pub fn config_of_cluster(
    id: u32,
    count: usize,
    ports: &[u16],
    dir: &Path,
    backend: &str,
    scheme: &str,
) -> Config {
    let peer = |n: usize| ports[2 * n];
    let client = |n: usize| ports[2 * n + 1];
    let nodes: Vec<String> = (0..count)
        .map(|n| {
            format!(
                "{{ id = {}, peer = \"{scheme}://127.0.0.1:{}\", client = [\"{scheme}://127.0.0.1:{}\"], shards = 1 }}",
                n + 1,
                peer(n),
                client(n)
            )
        })
        .collect();
    let device = match backend {
        "mem" => "backend = \"mem\"\nsize = \"96MiB\"".to_string(),
        _ => format!("backend = \"uring\"\npath = \"node{id}.img\"\nsize = \"96MiB\""),
    };
    let me = id as usize - 1;
    let text = format!(
        r#"
[node]
id = {id}
cores = [0]
data_dir = "{dir}"

[listen]
peer = "{scheme}://127.0.0.1:{peer}"
client = ["{scheme}://127.0.0.1:{client}"]

[cluster]
nodes = [{nodes}]

[[devices]]
{device}

[storage]
chunk_size = "1MiB"
wal_size_per_shard = "16MiB"

[raft]
tick_ms = 10
election_timeout_ms = 200
heartbeat_interval_ms = 30
lease_ms = 150
"#,
        dir = dir.display(),
        peer = peer(me),
        client = client(me),
        nodes = nodes.join(", "),
    );
    let mut config =
        Config::parse(Path::new("cluster-test.toml"), &text).expect("test config parses");
    config.net = net_for(scheme);
    config
}

/// The `[net]` settings of nodes and clients over `scheme`. Over real verbs the device and GID
/// come from `RDMA_DEVICE`/`RDMA_GID_INDEX` (as in the verbs suites), and set-ups get time:
/// in the emulated Soft-RoCE guest registering a connection's regions takes seconds (about
/// 1-2 s each, measured, against milliseconds on hardware), so one landing slot, not four.
pub fn net_for(scheme: &str) -> NetSection {
    if scheme != "rdma" {
        return NetSection::default();
    }
    NetSection {
        connect_timeout_ms: 30_000,
        rdma_device: std::env::var("RDMA_DEVICE").ok(),
        rdma_gid_index: std::env::var("RDMA_GID_INDEX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        rdma_landing_slots: 1,
        ..NetSection::default()
    }
}

pub fn addresses(ports: &[u16]) -> Vec<NodeAddress> {
    addresses_over(ports, "tcp")
}

/// The client addresses of the three nodes, over transport `scheme`.
pub fn addresses_over(ports: &[u16], scheme: &str) -> Vec<NodeAddress> {
    addresses_with_shards(ports, scheme, 1)
}

/// The client addresses of three nodes of `shards` shards each.
pub fn addresses_with_shards(ports: &[u16], scheme: &str, shards: u32) -> Vec<NodeAddress> {
    addresses_of_cluster(3, ports, scheme, shards)
}

/// The client addresses of `count` nodes of `shards` shards each.
pub fn addresses_of_cluster(
    count: usize,
    ports: &[u16],
    scheme: &str,
    shards: u32,
) -> Vec<NodeAddress> {
    (0..count)
        .map(|n| NodeAddress {
            id: n as u64 + 1,
            endpoint: format!("{scheme}://127.0.0.1:{}", ports[2 * n + 1])
                .parse()
                .expect("endpoint"),
            shards,
        })
        .collect()
}

/// Runs `body` with a client on its own executor.
pub fn with_client<T: Send + 'static>(
    ports: &[u16],
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    with_client_over(ports, "tcp", body)
}

/// Runs `body` with a client over transport `scheme` on its own executor.
pub fn with_client_over<T: Send + 'static>(
    ports: &[u16],
    scheme: &str,
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    with_client_net(addresses_over(ports, scheme), net_for(scheme), body)
}

/// Runs `body` with a client of the nodes at `addresses` on its own executor.
pub fn with_client_of<T: Send + 'static>(
    addresses: Vec<NodeAddress>,
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    with_client_net(addresses, NetSection::default(), body)
}

/// The same, with the client's connections set up by `net`.
pub fn with_client_net<T: Send + 'static>(
    addresses: Vec<NodeAddress>,
    net: NetSection,
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    let config = ClientConfig {
        deadline: Duration::from_secs(20),
        net,
        ..ClientConfig::default()
    };
    with_client_config(addresses, config, body)
}

/// The same, with a client of `config`.
pub fn with_client_config<T: Send + 'static>(
    addresses: Vec<NodeAddress>,
    config: ClientConfig,
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("test-client")
        .spawn(move || async move { body(Client::new(&addresses, config)).await })
        .expect("client executor")
        .join()
        .expect("client thread")
}

pub fn block(value: u64) -> Bytes {
    let mut data = vec![0u8; 4096];
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (value as u8) ^ (i as u8);
    }
    data[..8].copy_from_slice(&value.to_le_bytes());
    Bytes::from(data)
}

/// Whether an external tool is installed; says it skips when it is not.
pub fn tool(name: &str) -> bool {
    let found = std::process::Command::new(name)
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        eprintln!("SKIPPED: `{name}` is not installed (Debian package qemu-utils or fio)");
    }
    found
}

/// Runs a tool, failing the test with its output when it fails; returns stdout and stderr.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .expect("run tool");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program} {args:?} failed:\n{text}"
    );
    text
}

/// The body of `GET path` from an HTTP server on 127.0.0.1:`port` (the metrics endpoint).
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
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

/// Hands `copyset`'s leadership to `node` and waits (at most 10 s) until `node` leads it.
pub async fn lead_from(client: &Client, copyset: dataplane::ids::CopysetId, node: u64) {
    if client.cached_leader(copyset) != Some(node) {
        client
            .transfer_leader(copyset, node)
            .await
            .expect("transfer accepted");
    }
    let began = std::time::Instant::now();
    while client
        .copyset_status(node, copyset)
        .await
        .map(|s| s.role)
        .ok()
        != Some(3)
    {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "node {node} does not lead copyset {copyset}"
        );
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
}
