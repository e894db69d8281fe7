//! A cluster of chunkservers inside this process — each node on its own executor thread with
//! its own shutdown signal — for the demo and for benchmarks that measure a cluster beside a
//! baseline in one run. Production runs one process per node (`chunkserver run`).

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crate::config::{Config, HostTopology};
use crate::protocol::NodeAddress;
use crate::server::run_node;
use crate::shard::ShutdownSignal;

struct LocalNode {
    shutdown: ShutdownSignal,
    thread: Option<JoinHandle<Result<(), String>>>,
}

/// Nodes running in this process.
pub struct LocalCluster {
    nodes: Vec<LocalNode>,
    addresses: Vec<NodeAddress>,
}

/// What a generated three-node cluster looks like.
#[derive(Debug, Clone)]
pub struct GeneratedCluster {
    /// Where the nodes keep their device files (`uring`), one folder per node.
    pub data_dir: PathBuf,
    /// `mem` or `uring`.
    pub backend: String,
    /// Device size per node.
    pub device_size: String,
    /// Chunk size.
    pub chunk_size: String,
    /// WAL size per shard.
    pub wal_size: String,
    /// Whether the nodes collect metrics (`metrics.collect`).
    pub collect_metrics: bool,
}

impl LocalCluster {
    /// Starts one node per configuration (already validated, with its cores).
    pub fn start(configs: Vec<(Config, Vec<u32>)>) -> LocalCluster {
        let mut addresses = Vec::new();
        let mut nodes = Vec::new();
        for (config, cores) in configs {
            if let Some(endpoint) = config.listen.client.first() {
                addresses.push(NodeAddress {
                    id: u64::from(config.node.id),
                    endpoint: *endpoint,
                    shards: cores.len() as u32,
                });
            }
            let shutdown = ShutdownSignal::new();
            let signal = shutdown.clone();
            let thread = std::thread::spawn(move || {
                run_node(&config, &cores, &signal).map_err(|e| e.to_string())
            });
            nodes.push(LocalNode {
                shutdown,
                thread: Some(thread),
            });
        }
        LocalCluster { nodes, addresses }
    }

    /// Three nodes on free loopback ports, one shard each on core 0.
    pub fn start_generated(options: &GeneratedCluster) -> Result<LocalCluster, String> {
        let ports = free_ports(6)?;
        let host = HostTopology::detect();
        let mut configs = Vec::new();
        for id in 1..=3u32 {
            // Spread the nodes over the host's cores (node 1 on the first, node 2 on the next,
            // and so on, around again), as three machines would not share one core.
            let online: Vec<u32> = host.online_cores.iter().copied().collect();
            let core = online
                .get((id as usize - 1) % online.len().max(1))
                .copied()
                .unwrap_or(0);
            let text = generated_config(id, core, &ports, options);
            let file = Path::new("generated-cluster.toml");
            let config = Config::parse(file, &text).map_err(|e| e.to_string())?;
            let resolved = config.validate(file, &host).map_err(|e| e.to_string())?;
            configs.push((config, resolved.cores));
        }
        Ok(LocalCluster::start(configs))
    }

    /// The nodes' client addresses.
    pub fn addresses(&self) -> &[NodeAddress] {
        &self.addresses
    }

    /// Stops one node (by position) and waits for it.
    pub fn stop_node(&mut self, position: usize) -> Result<(), String> {
        let Some(node) = self.nodes.get_mut(position) else {
            return Err(format!("no node at position {position}"));
        };
        node.shutdown.raise();
        match node.thread.take().map(|t| t.join()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(error))) => Err(error),
            Some(Err(_)) => Err("a node thread panicked".into()),
        }
    }

    /// Stops every node; reports what went wrong, if anything.
    pub fn stop(mut self) -> Result<(), String> {
        let mut errors = Vec::new();
        for position in 0..self.nodes.len() {
            if let Err(error) = self.stop_node(position) {
                errors.push(error);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for position in 0..self.nodes.len() {
            let _ = self.stop_node(position);
        }
    }
}

/// How many consecutive ports each port of [`free_ports`] reserves: a node's shards listen on
/// the base port plus the shard index.
pub const PORTS_PER_ENDPOINT: u16 = 16;

/// `count` loopback base ports, each followed by `PORTS_PER_ENDPOINT - 1` more that are also
/// free now, for clusters started in tests and benchmarks.
///
/// They come from below the kernel's ephemeral range (32768 and up on Linux): a port the kernel
/// handed out as free from that range can be taken a moment later as the source port of any
/// outgoing connection on the machine, before the node binds it. Each process starts at its own
/// offset and walks on, keeping only blocks it could bind whole.
pub fn free_ports(count: usize) -> Result<Vec<u16>, String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const BLOCKS: u32 = 22_000 / PORTS_PER_ENDPOINT as u32;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % BLOCKS,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut held = Vec::new();
    let mut ports = Vec::with_capacity(count);
    for _ in 0..BLOCKS {
        if ports.len() == count {
            break;
        }
        let block = NEXT.fetch_add(1, Ordering::Relaxed) % BLOCKS;
        let base = (FIRST + block * u32::from(PORTS_PER_ENDPOINT)) as u16;
        let bound: Result<Vec<_>, _> = (0..PORTS_PER_ENDPOINT)
            .map(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)))
            .collect();
        if let Ok(listeners) = bound {
            held.extend(listeners);
            ports.push(base);
        }
    }
    if ports.len() < count {
        return Err(format!(
            "found only {} free loopback port blocks of {count}",
            ports.len()
        ));
    }
    Ok(ports)
}

fn generated_config(id: u32, core: u32, ports: &[u16], options: &GeneratedCluster) -> String {
    let nodes: Vec<String> = (0..3)
        .map(|n| {
            format!(
                "{{ id = {}, peer = \"tcp://127.0.0.1:{}\", client = [\"tcp://127.0.0.1:{}\"], \
                 shards = 1 }}",
                n + 1,
                ports[2 * n],
                ports[2 * n + 1]
            )
        })
        .collect();
    let device = if options.backend == "uring" {
        format!(
            "backend = \"uring\"\npath = \"chunks.img\"\nsize = \"{}\"",
            options.device_size
        )
    } else {
        format!("backend = \"mem\"\nsize = \"{}\"", options.device_size)
    };
    let me = id as usize - 1;
    format!(
        "[node]\nid = {id}\ncores = [{core}]\ndata_dir = \"{dir}/node{id}\"\n\n[listen]\n\
         peer = \"tcp://127.0.0.1:{peer}\"\nclient = [\"tcp://127.0.0.1:{client}\"]\n\n\
         [cluster]\nnodes = [{nodes}]\n\n[[devices]]\n{device}\n\n[storage]\n\
         chunk_size = \"{chunk}\"\nwal_size_per_shard = \"{wal}\"\n\n[raft]\ntick_ms = 10\n\
         election_timeout_ms = 300\nheartbeat_interval_ms = 50\nlease_ms = 250\n\n\
         [metrics]\ncollect = {collect}\n",
        dir = options.data_dir.display(),
        peer = ports[2 * me],
        client = ports[2 * me + 1],
        nodes = nodes.join(", "),
        chunk = options.chunk_size,
        wal = options.wal_size,
        collect = options.collect_metrics,
    )
}
