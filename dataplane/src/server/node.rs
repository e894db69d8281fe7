//! Starting a chunkserver process from its configuration: prepare the device, start one pinned
//! shard per core, serve until the shutdown signal, stop cleanly.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};
use tracing::info;

use super::shard::{ClusterView, RaftTimings, ShardServer};
use crate::config::{Backend, Config};
use crate::net::{Listener, NetContext};
use crate::shard::{start_shards, ShardContext, ShutdownSignal};
use crate::storage::bdev::{self, Bdev};
use crate::storage::engine::{format, read_superblock, EngineOptions, FormatOptions, ShardEngine};

/// DMA buffer pool of each shard's device handle.
const POOL_BYTES: usize = 64 << 20;

/// Why a node could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration asks for something this build or host cannot do.
    #[error("{0}")]
    Config(String),
    /// Preparing or opening the device failed.
    #[error("device {device}: {reason}")]
    Device {
        /// Which device.
        device: String,
        /// What failed.
        reason: String,
    },
    /// A shard failed.
    #[error("shard {shard}: {reason}")]
    Shard {
        /// Which shard.
        shard: u32,
        /// What failed.
        reason: String,
    },
    /// The shards could not be started.
    #[error(transparent)]
    Start(#[from] crate::shard::ShardError),
}

/// How each shard reaches its device.
#[derive(Debug, Clone)]
enum DevicePlan {
    /// Every shard opens this file and uses its own region of it.
    Shared { uri: String },
    /// Every shard formats a private memory device of this size.
    PerShardMemory { size: u64 },
}

/// The cluster as this node sees it (itself included).
fn cluster_view(config: &Config, shards: u32) -> ClusterView {
    let mut view = ClusterView::default();
    for node in &config.cluster.nodes {
        view.nodes
            .insert(u64::from(node.id), (node.peer, node.shards));
    }
    view.nodes
        .entry(u64::from(config.node.id))
        .or_insert((config.listen.peer, shards));
    view
}

fn device_uuid(seed: u64) -> [u8; 16] {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut uuid = [0u8; 16];
    uuid[..8].copy_from_slice(&now.to_le_bytes());
    uuid[8..].copy_from_slice(&(seed ^ u64::from(std::process::id())).to_le_bytes());
    uuid
}

/// Makes sure a shared device is formatted for `shards` shards: formats a file this start
/// created, accepts a device formatted with the same geometry, refuses anything else.
fn prepare_shared_device(
    config: &Config,
    path: PathBuf,
    shards: u32,
) -> Result<DevicePlan, NodeError> {
    let device = path.display().to_string();
    let fail = |reason: String| NodeError::Device {
        device: device.clone(),
        reason,
    };
    let size = config
        .devices
        .first()
        .and_then(|d| d.size)
        .map(|s| s.bytes());
    let existed = path.exists();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| fail(format!("cannot create {}: {e}", parent.display())))?;
    }
    let uri = match size {
        Some(size) if !existed => format!("uring://{device}?size={size}"),
        _ => format!("uring://{device}"),
    };
    let options = FormatOptions {
        device_is_zeroed: !existed,
        ..FormatOptions::from_config(&config.storage, shards)
    };
    let open_uri = uri.clone();
    let seed = u64::from(config.node.id);
    let handle = LocalExecutorBuilder::new(Placement::Unbound)
        .name("device-prepare")
        .spawn(move || async move {
            let bdev = bdev::open(&open_uri, 8 << 20)
                .await
                .map_err(|e| e.to_string())?;
            match read_superblock(&bdev).await {
                Ok(superblock) => {
                    if superblock.geometry.shard_count != shards {
                        return Err(format!(
                            "formatted for {} shards, but node.cores gives {shards}; use the \
                             same cores, or reformat the device",
                            superblock.geometry.shard_count
                        ));
                    }
                    Ok(false)
                }
                Err(_) if !existed => {
                    format(&bdev, &options, device_uuid(seed))
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(true)
                }
                Err(error) => Err(format!(
                    "{error}; the file exists but holds no chunkserver format (remove it to \
                     let the next start format it)"
                )),
            }
        })
        .map_err(|e| fail(e.to_string()))?;
    let formatted = handle
        .join()
        .map_err(|_| fail("preparation thread panicked".into()))?
        .map_err(fail)?;
    if formatted {
        info!(device, shards, "device formatted");
    }
    Ok(DevicePlan::Shared {
        uri: format!("uring://{device}"),
    })
}

/// Runs the node until `shutdown` is raised; returns once every shard has stopped.
pub fn run_node(
    config: &Config,
    cores: &[u32],
    shutdown: &ShutdownSignal,
) -> Result<(), NodeError> {
    let shards = cores.len() as u32;
    let device = config
        .devices
        .first()
        .ok_or_else(|| NodeError::Config("no device configured".into()))?;
    if config.devices.len() > 1 {
        return Err(NodeError::Config(
            "more than one device per process is not supported yet; list one [[devices]]".into(),
        ));
    }
    let plan = match device.backend {
        Backend::Mem => {
            let size = device.size.map(|s| s.bytes()).unwrap_or(0);
            let page = config.storage.page_size.bytes();
            DevicePlan::PerShardMemory {
                size: (size / u64::from(shards)) / page * page,
            }
        }
        Backend::Uring => {
            let path = config
                .device_path(device)
                .ok_or_else(|| NodeError::Config("the uring device needs a path".into()))?;
            prepare_shared_device(config, path, shards)?
        }
        Backend::Spdk => {
            return Err(NodeError::Config(
                "the spdk backend is not built into this binary".into(),
            ))
        }
    };
    let cluster = cluster_view(config, shards);
    let tick = Duration::from_millis(config.raft.tick_ms);
    let timings = RaftTimings {
        tick,
        election_ticks: (config.raft.election_timeout_ms / config.raft.tick_ms).max(2) as u32,
        heartbeat_ticks: (config.raft.heartbeat_interval_ms / config.raft.tick_ms).max(1) as u32,
    };
    let node = u64::from(config.node.id);
    let storage = config.storage.clone();
    let peer_endpoint = config.listen.peer;
    let client_endpoints = config.listen.client.clone();
    let stop_all = shutdown.clone();

    let results = start_shards(cores, 64, shutdown, move |ctx: ShardContext<()>| {
        let plan = plan.clone();
        let cluster = cluster.clone();
        let storage = storage.clone();
        let client_endpoints = client_endpoints.clone();
        let stop_all = stop_all.clone();
        async move {
            let shard = ctx.shard.0;
            let result = async {
                let (uri, device_shard, fresh_memory) = match &plan {
                    DevicePlan::Shared { uri } => (uri.clone(), shard, false),
                    DevicePlan::PerShardMemory { size } => (format!("mem://?size={size}"), 0, true),
                };
                let bdev = bdev::open(&uri, POOL_BYTES)
                    .await
                    .map_err(|e| e.to_string())?;
                if fresh_memory {
                    let options = FormatOptions {
                        device_is_zeroed: true,
                        ..FormatOptions::from_config(&storage, 1)
                    };
                    format(&bdev, &options, device_uuid(node ^ u64::from(shard)))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                let capacity = bdev.capacity();
                let (engine, recovery) =
                    ShardEngine::open(Rc::new(bdev), device_shard, EngineOptions::default())
                        .await
                        .map_err(|e| e.to_string())?;
                info!(
                    node,
                    shard,
                    capacity,
                    copysets = recovery.copysets.len(),
                    wal_records = recovery.wal_records,
                    "shard engine open"
                );
                let server =
                    ShardServer::new(node, shard, Rc::new(engine), &recovery, cluster, timings)
                        .map_err(|e| e.to_string())?;
                let net = NetContext::default();
                let peer = Listener::bind_shard(&peer_endpoint, shard, &net)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut clients = Vec::new();
                for endpoint in &client_endpoints {
                    clients.push(
                        Listener::bind_shard(endpoint, shard, &net)
                            .await
                            .map_err(|e| e.to_string())?,
                    );
                }
                info!(node, shard, core = ctx.core, "shard serving");
                server.run(peer, clients, ctx.shutdown.clone()).await;
                Ok::<(), String>(())
            }
            .await;
            if result.is_err() {
                // One shard that cannot run takes the node down rather than serving partly.
                stop_all.raise();
            }
            result.map_err(|reason| NodeError::Shard { shard, reason })
        }
    })?;
    results.into_iter().collect()
}
