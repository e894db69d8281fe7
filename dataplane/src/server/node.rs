//! Starting a chunkserver process from its configuration: prepare the device, start one pinned
//! shard per core, serve until the shutdown signal, stop cleanly.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};
use tracing::info;

use super::shard::{ClusterView, RaftTimings, ShardServer};
use crate::config::{Backend, Config};
use crate::net::{Listener, NetContext};
use crate::shard::{start_shards, ShardContext, ShutdownSignal};
use crate::storage::bdev::inject::{DiskFaults, InjectedBdev};
use crate::storage::bdev::{self, AnyBdev, Bdev};
use crate::storage::engine::{format, read_superblock, EngineOptions, FormatOptions, ShardEngine};

use super::shard::{ShardMessage, ShardReport};

/// How long a scrape waits for another shard's report.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound of each shard's DMA buffer pool (an accounting limit: memory is taken as used). Opening
/// a shard reads every copyset page in one buffer, so it must hold 8 KiB per copyset.
const POOL_BYTES: usize = 256 << 20;

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
        private_dir(parent)
            .map_err(|e| fail(format!("cannot create {}: {e}", parent.display())))?;
    }
    let uri = match size {
        Some(size) if !existed => format!("uring://{device}?size={size}"),
        _ => format!("uring://{device}"),
    };
    let refusal = "the file exists but holds no chunkserver format (remove it to let the next \
                   start format it)";
    format_if_new(config, &uri, !existed, refusal, !existed, shards).map_err(fail)?;
    Ok(DevicePlan::Shared {
        uri: format!("uring://{device}"),
    })
}

/// Opens `uri` on a thread of its own and checks its format: a device formatted for another
/// shard count is refused; one without a format is formatted when `may_format` (zeroed
/// already when `zeroed`), refused with `refusal` otherwise.
fn format_if_new(
    config: &Config,
    uri: &str,
    may_format: bool,
    refusal: &'static str,
    zeroed: bool,
    shards: u32,
) -> Result<(), String> {
    let options = FormatOptions {
        device_is_zeroed: zeroed,
        ..config.storage.format_options(shards)
    };
    let open_uri = uri.to_string();
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
                Err(_) if may_format => {
                    format(&bdev, &options, device_uuid(seed))
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(true)
                }
                Err(error) => Err(format!("{error}; {refusal}")),
            }
        })
        .map_err(|e| e.to_string())?;
    let formatted = handle
        .join()
        .map_err(|_| "the preparation thread panicked".to_string())??;
    if formatted {
        info!(uri, shards, "device formatted");
    }
    Ok(())
}

/// Starts SPDK with the bdevs the configuration defines, and formats the device if it is new.
#[cfg(feature = "spdk")]
fn prepare_spdk_device(
    config: &Config,
    device: &crate::config::DeviceSection,
    shards: u32,
) -> Result<DevicePlan, NodeError> {
    use crate::config::SpdkCreate;
    let name = device.bdev.clone().unwrap_or_default();
    let fail = |reason: String| NodeError::Device {
        device: format!("spdk://{name}"),
        reason,
    };
    let mut fresh = false;
    let json = match &config.spdk.config_file {
        Some(file) => {
            let path = config.node.data_dir.join(file);
            std::fs::read_to_string(&path).map_err(|e| {
                fail(format!(
                    "cannot read the SPDK config {}: {e}",
                    path.display()
                ))
            })?
        }
        None => {
            let method = match device.create {
                Some(SpdkCreate::Malloc) => {
                    fresh = true;
                    let size = device.size.map(|s| s.bytes()).unwrap_or(0);
                    serde_json::json!({"method": "bdev_malloc_create", "params": {
                        "name": name, "num_blocks": size / 4096, "block_size": 4096}})
                }
                Some(SpdkCreate::Aio) => {
                    let path = config
                        .device_path(device)
                        .ok_or_else(|| fail("an aio bdev needs a path".into()))?;
                    if !path.exists() {
                        let size = device.size.map(|s| s.bytes()).ok_or_else(|| {
                            fail(format!(
                                "{} does not exist and no size is given",
                                path.display()
                            ))
                        })?;
                        if let Some(parent) = path.parent() {
                            private_dir(parent).map_err(|e| fail(e.to_string()))?;
                        }
                        let file = std::os::unix::fs::OpenOptionsExt::mode(
                            std::fs::OpenOptions::new().write(true).create_new(true),
                            0o600,
                        )
                        .open(&path)
                        .map_err(|e| fail(e.to_string()))?;
                        file.set_len(size).map_err(|e| fail(e.to_string()))?;
                        fresh = true;
                    }
                    serde_json::json!({"method": "bdev_aio_create", "params": {
                        "name": name, "filename": path.display().to_string(), "block_size": 4096}})
                }
                Some(SpdkCreate::Nvme) => {
                    let controller = name.strip_suffix("n1").unwrap_or(&name);
                    serde_json::json!({"method": "bdev_nvme_attach_controller", "params": {
                        "name": controller, "trtype": "PCIe",
                        "traddr": device.pcie.clone().unwrap_or_default()}})
                }
                None => return Err(fail("no spdk.config_file and no `create`".into())),
            };
            serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": [method]}]})
                .to_string()
        }
    };
    let options = ffi::spdk::EnvOptions {
        name: "chunkserver".into(),
        hugepages: config.spdk.hugepages,
        mem_size_mb: u32::try_from(config.spdk.mem_size.bytes() >> 20).unwrap_or(u32::MAX),
        pci: config.spdk.pci,
        json_config: json,
    };
    ffi::spdk::start(&options).map_err(|e| fail(e.to_string()))?;
    info!(bdev = %name, version = %ffi::spdk::version(), "SPDK started");
    let uri = format!("spdk://{name}");
    format_if_new(
        config,
        &uri,
        fresh || config.spdk.format,
        "the bdev holds no chunkserver format (set spdk.format = true to format it)",
        fresh,
        shards,
    )
    .map_err(fail)?;
    Ok(DevicePlan::Shared { uri })
}

#[cfg(not(feature = "spdk"))]
fn prepare_spdk_device(
    _config: &Config,
    _device: &crate::config::DeviceSection,
    _shards: u32,
) -> Result<DevicePlan, NodeError> {
    Err(NodeError::Config(
        "the spdk backend is not built into this binary (build with --features spdk)".into(),
    ))
}

/// Gathers every shard's report: this shard's directly, the others' through the mesh.
async fn gather_reports<B: crate::storage::bdev::Bdev + 'static>(
    server: &ShardServer<B>,
    mesh: &crate::shard::Mesh<ShardMessage>,
) -> Vec<ShardReport> {
    let mut reports = vec![ShardReport {
        metrics: server.metrics_snapshot(),
        status: server.status_json(),
    }];
    for shard in (0..mesh.shard_count()).filter(|&s| s != mesh.me().0) {
        let (sender, receiver) = glommio::channels::shared_channel::new_bounded(1);
        if mesh
            .send(crate::shard::ShardId(shard), ShardMessage::Scrape(sender))
            .await
            .is_err()
        {
            continue;
        }
        let receiver = receiver.connect().await;
        let report = futures_lite::future::or(receiver.recv(), async {
            glommio::timer::sleep(SCRAPE_TIMEOUT).await;
            None
        })
        .await;
        reports.extend(report);
    }
    reports
}

fn metrics_pages<B: crate::storage::bdev::Bdev + 'static>(
    node: u64,
    server: Rc<ShardServer<B>>,
    mesh: Rc<crate::shard::Mesh<ShardMessage>>,
) -> crate::metrics::http::Pages {
    let (metrics_server, metrics_mesh) = (Rc::clone(&server), Rc::clone(&mesh));
    crate::metrics::http::Pages {
        metrics: Box::new(move || {
            let (server, mesh) = (Rc::clone(&metrics_server), Rc::clone(&metrics_mesh));
            Box::pin(async move {
                let mut merged = crate::metrics::Snapshot::default();
                for report in gather_reports(&server, &mesh).await {
                    merged.merge(report.metrics);
                }
                merged.render()
            })
        }),
        fault: None,
        status: Box::new(move || {
            let (server, mesh) = (Rc::clone(&server), Rc::clone(&mesh));
            Box::pin(async move {
                let reports = gather_reports(&server, &mesh).await;
                let shards = reports.len();
                let copysets: Vec<serde_json::Value> =
                    reports.into_iter().flat_map(|r| r.status).collect();
                serde_json::json!({"node": node, "shards": shards, "copysets": copysets})
                    .to_string()
            })
        }),
    }
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
        Backend::Spdk => prepare_spdk_device(config, device, shards)?,
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
    let metrics_address = config.metrics.address;
    let trace_every = config.log.trace_every;
    let collect_metrics = config.metrics.collect;
    // Memory is bound to the configured NUMA node only where the host has more than one.
    let numa_node = (crate::config::HostTopology::detect().numa_nodes.len() > 1)
        .then_some(config.node.numa_node);
    let faults = config.fault.injection.then(|| {
        let file = match &plan {
            DevicePlan::Shared { .. } => config.device_path(device),
            DevicePlan::PerShardMemory { .. } => None,
        };
        tracing::warn!(node, "fault injection is on: POST /fault arms disk faults");
        DiskFaults::new(config.fault.seed, file)
    });

    let results = start_shards(
        cores,
        64,
        shutdown,
        move |mut ctx: ShardContext<ShardMessage>| {
            let plan = plan.clone();
            let cluster = cluster.clone();
            let storage = storage.clone();
            let client_endpoints = client_endpoints.clone();
            let stop_all = stop_all.clone();
            let faults = faults.clone();
            async move {
                let shard = ctx.shard.0;
                let result = async {
                    if let Some(numa) = numa_node {
                        ffi::numa::bind_thread_memory(numa)
                            .map_err(|e| format!("binding memory to NUMA node {numa}: {e}"))?;
                        info!(node, shard, numa, "shard memory bound to its NUMA node");
                    }
                    let (uri, device_shard, fresh_memory) = match &plan {
                        DevicePlan::Shared { uri } => (uri.clone(), shard, false),
                        DevicePlan::PerShardMemory { size } => {
                            (format!("mem://?size={size}"), 0, true)
                        }
                    };
                    let bdev = bdev::open(&uri, POOL_BYTES)
                        .await
                        .map_err(|e| e.to_string())?;
                    if fresh_memory {
                        let options = FormatOptions {
                            device_is_zeroed: true,
                            ..storage.format_options(1)
                        };
                        format(&bdev, &options, device_uuid(node ^ u64::from(shard)))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    #[cfg(feature = "spdk")]
                    if let AnyBdev::Spdk(spdk) = &bdev {
                        glommio::spawn_local(spdk.idle_poller()).detach();
                    }
                    let bdev = match &faults {
                        Some(faults) => AnyBdev::Injected(Box::new(InjectedBdev::new(
                            bdev,
                            Arc::clone(faults),
                            shard,
                        ))),
                        None => bdev,
                    };
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
                    let server = ShardServer::new(
                        node,
                        shard,
                        Rc::new(engine),
                        &recovery,
                        cluster,
                        timings,
                        collect_metrics,
                    )
                    .map_err(|e| e.to_string())?;
                    server.set_trace_every(trace_every);
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
                    // Answer other shards' scrapes and serve the requests they forward.
                    for (_, receiver) in ctx.mesh.take_receivers() {
                        let server = Rc::clone(&server);
                        glommio::spawn_local(async move {
                            while let Some(message) = receiver.recv().await {
                                match message {
                                    ShardMessage::Scrape(reply) => {
                                        let reply = reply.connect().await;
                                        let report = ShardReport {
                                            metrics: server.metrics_snapshot(),
                                            status: server.status_json(),
                                        };
                                        // The scraper may have given up; nothing to do then.
                                        let _ = reply.send(report).await;
                                    }
                                    ShardMessage::Forward(forwarded) => {
                                        let server = Rc::clone(&server);
                                        glommio::spawn_local(async move {
                                            server.serve_forwarded(forwarded).await
                                        })
                                        .detach();
                                    }
                                }
                            }
                        })
                        .detach();
                    }
                    let mesh = Rc::new(ctx.mesh);
                    server.set_mesh(Rc::clone(&mesh));
                    if let (0, Some(address)) = (shard, metrics_address) {
                        let listener = crate::metrics::http::bind(address)
                            .map_err(|e| format!("metrics endpoint {address}: {e}"))?;
                        let mut pages = metrics_pages(node, Rc::clone(&server), Rc::clone(&mesh));
                        if let Some(faults) = &faults {
                            let faults = Arc::clone(faults);
                            pages.fault = Some(Box::new(move |query: &str| {
                                crate::storage::bdev::inject::control(&faults, query)
                            }));
                        }
                        let stop = ctx.shutdown.clone();
                        glommio::spawn_local(crate::metrics::http::serve(
                            listener,
                            Rc::new(pages),
                            stop,
                        ))
                        .detach();
                        info!(node, %address, "metrics endpoint serving /metrics and /status");
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
        },
    )?;
    results.into_iter().collect()
}

/// Creates `dir` and its missing parents readable by this user alone (0700); directories that
/// exist keep their modes (they are the operator's).
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
}
