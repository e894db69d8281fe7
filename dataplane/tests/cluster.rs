//! Three chunkservers on loopback, in this process, each with its own shard executor: writes
//! replicate and read back, survive the loss of the leader, and survive a restart of the whole
//! cluster from its files. Every node listens on 127.0.0.1 and stops on its own signal.

use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dataplane::client::{Client, ClientConfig, NodeAddress};
use dataplane::config::Config;
use dataplane::ids::{ChunkId, CopysetId};
use dataplane::server::run_node;
use dataplane::shard::ShutdownSignal;
use glommio::{LocalExecutorBuilder, Placement};

struct Node {
    shutdown: ShutdownSignal,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Node {
    fn start(config: Config) -> Node {
        let shutdown = ShutdownSignal::new();
        let signal = shutdown.clone();
        let thread =
            std::thread::spawn(move || run_node(&config, &[0], &signal).map_err(|e| e.to_string()));
        Node {
            shutdown,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
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

fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

/// The configuration of node `id` (1-based) of a three-node cluster.
fn config(id: u32, ports: &[u16], dir: &Path, backend: &str) -> Config {
    let peer = |n: usize| ports[2 * n];
    let client = |n: usize| ports[2 * n + 1];
    let nodes: Vec<String> = (0..3)
        .map(|n| {
            format!(
                "{{ id = {}, peer = \"tcp://127.0.0.1:{}\", client = [\"tcp://127.0.0.1:{}\"], shards = 1 }}",
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
peer = "tcp://127.0.0.1:{peer}"
client = ["tcp://127.0.0.1:{client}"]

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
    Config::parse(Path::new("cluster-test.toml"), &text).expect("test config parses")
}

fn addresses(ports: &[u16]) -> Vec<NodeAddress> {
    (0..3)
        .map(|n| NodeAddress {
            id: n as u64 + 1,
            endpoint: format!("tcp://127.0.0.1:{}", ports[2 * n + 1])
                .parse()
                .expect("endpoint"),
            shards: 1,
        })
        .collect()
}

/// Runs `body` with a client on its own executor.
fn with_client<T: Send + 'static>(
    ports: &[u16],
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    let addresses = addresses(ports);
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("test-client")
        .spawn(move || async move {
            let config = ClientConfig {
                deadline: Duration::from_secs(20),
                ..ClientConfig::default()
            };
            body(Client::new(&addresses, config)).await
        })
        .expect("client executor")
        .join()
        .expect("client thread")
}

fn block(value: u64) -> Bytes {
    let mut data = vec![0u8; 4096];
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (value as u8) ^ (i as u8);
    }
    data[..8].copy_from_slice(&value.to_le_bytes());
    Bytes::from(data)
}

const COPYSET: CopysetId = CopysetId(7);

#[test]
fn writes_replicate_read_back_and_survive_the_leader_stopping() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "mem")))
        .collect();

    let leader = with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            for i in 0..32u64 {
                let chunk = ChunkId(1 + i % 2);
                client
                    .write(COPYSET, chunk, (i as u32 / 2) * 4096, block(i), 1)
                    .await
                    .expect("write");
            }
            for i in 0..32u64 {
                let chunk = ChunkId(1 + i % 2);
                let data = client
                    .read(COPYSET, chunk, u64::from(i as u32 / 2) * 4096, 4096)
                    .await
                    .expect("read");
                assert_eq!(data, block(i), "block {i}");
            }
            // A never-written region reads as zeroes.
            let zeroes = client
                .read(COPYSET, ChunkId(9), 0, 4096)
                .await
                .expect("read");
            assert!(zeroes.iter().all(|&b| b == 0));
            let leader = client.cached_leader(COPYSET).expect("a leader answered");
            // Every replica applied everything.
            let started = Instant::now();
            loop {
                let mut applied = Vec::new();
                for node in 1..=3 {
                    applied.push(
                        client
                            .copyset_status(node, COPYSET)
                            .await
                            .expect("status")
                            .applied,
                    );
                }
                if applied.iter().all(|&a| a == applied[0]) {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "replicas lag: {applied:?}"
                );
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            leader
        })
    });

    // Stop the leader; the other two elect a new one and keep every acknowledged write.
    nodes[leader as usize - 1].stop();
    with_client(&ports, move |client| {
        Box::pin(async move {
            client.set_peers(COPYSET, &[1, 2, 3]);
            for i in 32..48u64 {
                client
                    .write(COPYSET, ChunkId(3), (i as u32 - 32) * 4096, block(i), 1)
                    .await
                    .expect("write after failover");
            }
            for i in 0..32u64 {
                let chunk = ChunkId(1 + i % 2);
                let data = client
                    .read(COPYSET, chunk, u64::from(i as u32 / 2) * 4096, 4096)
                    .await
                    .expect("read");
                assert_eq!(data, block(i), "block {i} after failover");
            }
            let new_leader = client.cached_leader(COPYSET).expect("new leader");
            assert_ne!(new_leader, leader);
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

#[test]
fn a_cluster_restarted_from_its_files_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "uring")))
        .collect();
    with_client(&ports, |client| {
        Box::pin(async move {
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            for i in 0..24u64 {
                client
                    .write(COPYSET, ChunkId(5), i as u32 * 4096, block(i), 1)
                    .await
                    .expect("write");
            }
        })
    });
    for node in &mut nodes {
        node.stop();
    }
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "uring")))
        .collect();
    with_client(&ports, |client| {
        Box::pin(async move {
            client.set_peers(COPYSET, &[1, 2, 3]);
            for i in 0..24u64 {
                let data = client
                    .read(COPYSET, ChunkId(5), i * 4096, 4096)
                    .await
                    .expect("read after restart");
                assert_eq!(data, block(i), "block {i} after restart");
            }
            client
                .write(COPYSET, ChunkId(5), 0, block(99), 1)
                .await
                .expect("write after restart");
            assert_eq!(
                client
                    .read(COPYSET, ChunkId(5), 0, 4096)
                    .await
                    .expect("read"),
                block(99)
            );
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}

#[test]
fn debug_write_throughput() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "mem")))
        .collect();
    with_client(&ports, |client| {
        Box::pin(async move {
            let client = std::rc::Rc::new(client);
            client
                .create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("create copyset");
            let started = Instant::now();
            for i in 0..200u64 {
                let t = Instant::now();
                client
                    .write(COPYSET, ChunkId(1), (i as u32 % 64) * 4096, block(i), 1)
                    .await
                    .expect("write");
                if t.elapsed() > Duration::from_millis(20) {
                    eprintln!("write {i} took {:?}", t.elapsed());
                }
            }
            eprintln!("200 sequential writes: {:?}", started.elapsed());
            let started = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..32u64 {
                let client = client.clone();
                tasks.push(glommio::spawn_local(async move {
                    for i in 0..10u64 {
                        let t = Instant::now();
                        client
                            .write(
                                COPYSET,
                                ChunkId(2),
                                ((w * 10 + i) as u32 % 64) * 4096,
                                block(i),
                                1,
                            )
                            .await
                            .expect("write");
                        if t.elapsed() > Duration::from_millis(50) {
                            eprintln!("qd32 write {w}/{i} took {:?}", t.elapsed());
                        }
                    }
                }));
            }
            for t in tasks {
                t.await;
            }
            eprintln!("320 writes at QD32: {:?}", started.elapsed());
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}
