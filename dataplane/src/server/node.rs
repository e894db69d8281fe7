//! Starting a chunkserver process from its configuration: prepare the device, start one pinned
//! shard per core, serve until the shutdown signal, stop cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::shared_channel::ConnectedReceiver;
use glommio::{LocalExecutorBuilder, Placement};
use tracing::info;

use super::shard::{ClusterView, RaftTimings, ShardServer};
use crate::config::{Backend, Config, DeviceSection, Endpoint, StorageSection};
use crate::net::auth::{Keys, Role};
use crate::net::handshake::Auth;
use crate::net::{Listener, NetContext};
use crate::shard::{start_shards, ShardContext, ShardId, ShutdownSignal};
use crate::storage::bdev::inject::{DiskFaults, InjectedBdev};
use crate::storage::bdev::{self, AnyBdev, Bdev};
use crate::storage::engine::{format, read_superblock, EngineOptions, FormatOptions, ShardEngine};

use super::heartbeat::HeartbeatSettings;
use super::shard::ShardMessage;

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
    let name = device.bdev.clone().unwrap_or_default();
    let fail = |reason: String| NodeError::Device {
        device: format!("spdk://{name}"),
        reason,
    };
    let (json, fresh) = spdk_json_config(config, device, &name).map_err(fail)?;
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

/// The SPDK JSON configuration: the operator's `spdk.config_file`, or one that creates the
/// bdev `name` as the device's `create` says; with whether that bdev is fresh (created empty
/// by this start).
#[cfg(feature = "spdk")]
fn spdk_json_config(
    config: &Config,
    device: &crate::config::DeviceSection,
    name: &str,
) -> Result<(String, bool), String> {
    match &config.spdk.config_file {
        Some(file) => {
            let path = config.node.data_dir.join(file);
            let json = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read the SPDK config {}: {e}", path.display()))?;
            Ok((json, false))
        }
        None => {
            let (method, fresh) = spdk_create_method(config, device, name)?;
            let json =
                serde_json::json!({"subsystems": [{"subsystem": "bdev", "config": [method]}]})
                    .to_string();
            Ok((json, fresh))
        }
    }
}

/// The SPDK call that creates the bdev `name` as the device's `create` says, with whether
/// the bdev is fresh: a malloc bdev always is, an aio bdev when this start creates its file.
#[cfg(feature = "spdk")]
fn spdk_create_method(
    config: &Config,
    device: &crate::config::DeviceSection,
    name: &str,
) -> Result<(serde_json::Value, bool), String> {
    use crate::config::SpdkCreate;
    let mut fresh = false;
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
                .ok_or_else(|| "an aio bdev needs a path".to_string())?;
            if !path.exists() {
                create_aio_file(device, &path)?;
                fresh = true;
            }
            serde_json::json!({"method": "bdev_aio_create", "params": {
                "name": name, "filename": path.display().to_string(), "block_size": 4096}})
        }
        Some(SpdkCreate::Nvme) => {
            let controller = name.strip_suffix("n1").unwrap_or(name);
            serde_json::json!({"method": "bdev_nvme_attach_controller", "params": {
                "name": controller, "trtype": "PCIe",
                "traddr": device.pcie.clone().unwrap_or_default()}})
        }
        None => return Err("no spdk.config_file and no `create`".into()),
    };
    Ok((method, fresh))
}

/// Creates the file `path` of an aio bdev, of the device's size and readable by this user
/// alone (0600), its missing directories too.
#[cfg(feature = "spdk")]
fn create_aio_file(
    device: &crate::config::DeviceSection,
    path: &std::path::Path,
) -> Result<(), String> {
    let size = device
        .size
        .map(|s| s.bytes())
        .ok_or_else(|| format!("{} does not exist and no size is given", path.display()))?;
    if let Some(parent) = path.parent() {
        private_dir(parent).map_err(|e| e.to_string())?;
    }
    let file = std::os::unix::fs::OpenOptionsExt::mode(
        std::fs::OpenOptions::new().write(true).create_new(true),
        0o600,
    )
    .open(path)
    .map_err(|e| e.to_string())?;
    file.set_len(size).map_err(|e| e.to_string())
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
                for report in super::heartbeat::gather_reports(&server, &mesh).await {
                    merged.merge(report.metrics);
                }
                merged.render()
            })
        }),
        fault: None,
        tokens: None,
        status: Box::new(move || {
            let (server, mesh) = (Rc::clone(&server), Rc::clone(&mesh));
            Box::pin(async move {
                let reports = super::heartbeat::gather_reports(&server, &mesh).await;
                let shards = reports.len();
                let connections: Vec<serde_json::Value> =
                    reports.iter().map(|r| r.connections.clone()).collect();
                let copysets: Vec<serde_json::Value> =
                    reports.into_iter().flat_map(|r| r.status).collect();
                serde_json::json!({
                    "node": node,
                    "shards": shards,
                    "copysets": copysets,
                    "connections": connections,
                })
                .to_string()
            })
        }),
    }
}

/// What every shard of the node starts from, read from the configuration once.
struct ShardSettings {
    node: u64,
    /// How the shards reach the device.
    plan: DevicePlan,
    cluster: ClusterView,
    timings: RaftTimings,
    storage: StorageSection,
    peer_endpoint: Endpoint,
    client_endpoints: Vec<Endpoint>,
    /// Raised when a shard cannot run, to stop the others.
    stop_all: ShutdownSignal,
    metrics_address: Option<SocketAddr>,
    trace_every: u64,
    collect_metrics: bool,
    /// The NUMA node to bind the shards' memory to.
    numa_node: Option<u32>,
    /// The disk faults to inject, when `[fault] injection` is on.
    faults: Option<Arc<DiskFaults>>,
    /// The admin token (`[admin] token_file`), read at start.
    admin_token: Option<Vec<u8>>,
    /// The cluster secret (`[auth] secret_file`), read at start: incoming connections are
    /// checked with it, outgoing peer connections prove the peer role, the node's own clients
    /// (heartbeat, scheduler, scrubber) the admin role.
    auth: Option<Auth>,
    /// The placement service's settings and this node's labels.
    placement: PlacementSettings,
    /// Connection timeouts and the RDMA device and rings.
    net: crate::config::NetSection,
}

/// What the heartbeat and the placement service need from the configuration.
struct PlacementSettings {
    /// Where the cluster's nodes take client requests (the service is found among them).
    nodes: Vec<crate::protocol::NodeAddress>,
    /// This node's zone and host labels.
    zone: String,
    host: String,
    heartbeat: Duration,
    offline_after: Duration,
    /// The recovery scheduler's limits.
    limits: crate::placement::schedule::Limits,
    /// Whether leaders are balanced.
    balance_leaders: bool,
    /// Whether replicas are balanced over the nodes.
    balance_copysets: bool,
    /// Bytes per second a shard copies into snapshot installs (0: unlimited).
    recovery_bytes_per_s: u64,
    /// The background scrub.
    scrub: super::shard::ScrubSettings,
}

impl PlacementSettings {
    fn new(config: &Config) -> PlacementSettings {
        let me = config
            .cluster
            .nodes
            .iter()
            .find(|n| n.id == config.node.id)
            .cloned();
        let host = me.as_ref().map_or_else(
            || config.listen.peer.addr.ip().to_string(),
            crate::config::ClusterNode::host_label,
        );
        let zone = me
            .as_ref()
            .map_or_else(|| host.clone(), crate::config::ClusterNode::zone_label);
        PlacementSettings {
            nodes: crate::protocol::NodeAddress::from_config(config),
            zone,
            host,
            heartbeat: config.placement.heartbeat(),
            offline_after: config.placement.offline_after(),
            limits: crate::placement::schedule::Limits {
                max_running: config.placement.max_recoveries as usize,
                max_per_node: config.placement.max_recoveries_per_node as usize,
            },
            balance_leaders: config.placement.balance_leaders,
            balance_copysets: config.placement.balance_copysets,
            recovery_bytes_per_s: config.placement.recovery_mib_per_s.saturating_mul(1 << 20),
            scrub: super::shard::ScrubSettings {
                bytes_per_s: config.placement.scrub_mib_per_s.saturating_mul(1 << 20),
                every: Duration::from_millis(config.placement.scrub_every_ms),
                repair: config.placement.scrub_repair,
            },
        }
    }
}

impl ShardSettings {
    /// The settings of the `shards` shards that `config` describes, reaching `device` by
    /// `plan`; `shutdown` is what stops them all.
    fn new(
        config: &Config,
        (device, plan): (&DeviceSection, DevicePlan),
        shards: u32,
        shutdown: &ShutdownSignal,
        admin_token: Option<Vec<u8>>,
        auth: Option<Auth>,
    ) -> ShardSettings {
        let cluster = cluster_view(config, shards);
        let timings = raft_timings(config);
        let node = u64::from(config.node.id);
        // Memory is bound to the configured NUMA node only where the host has more than one.
        let numa_node = (crate::config::HostTopology::detect().numa_nodes.len() > 1)
            .then_some(config.node.numa_node);
        let faults = disk_faults(config, device, &plan, node);
        ShardSettings {
            node,
            plan,
            cluster,
            timings,
            storage: config.storage.clone(),
            peer_endpoint: config.listen.peer,
            client_endpoints: config.listen.client.clone(),
            stop_all: shutdown.clone(),
            metrics_address: config.metrics.address,
            net: config.net.clone(),
            trace_every: config.log.trace_every,
            collect_metrics: config.metrics.collect,
            numa_node,
            faults,
            admin_token,
            auth,
            placement: PlacementSettings::new(config),
        }
    }
}

/// The node's keys: the cluster secret, claiming the peer role on its peer connections. A
/// server checks every role, so a role key will not do.
fn server_auth(config: &Config) -> Result<Option<Auth>, NodeError> {
    let auth = Auth::load(&config.auth, Role::Peer).map_err(NodeError::Config)?;
    if let Some(Auth {
        keys: Keys::Role(..),
        ..
    }) = auth
    {
        return Err(NodeError::Config(
            "auth: a server needs auth.secret_file (the cluster secret), not a role's key_file"
                .into(),
        ));
    }
    if auth.is_none() {
        tracing::info!(
            "[auth] is not configured: any process that reaches this node's ports may read, \
             write and change everything (docs/operations.md, \"Authentication\")"
        );
    }
    Ok(auth)
}

impl ShardSettings {
    /// The bearer tokens of the metrics endpoint with `[auth]`: the client and admin keys.
    fn http_tokens(&self) -> Option<crate::metrics::http::Tokens> {
        let Some(Auth {
            keys: Keys::Secret(secret),
            ..
        }) = &self.auth
        else {
            return None;
        };
        let key = |role| crate::net::handshake::key_text(&crate::net::auth::role_key(secret, role));
        Some(crate::metrics::http::Tokens {
            read: vec![key(Role::Client), key(Role::Admin)],
            admin: key(Role::Admin),
        })
    }

    /// The keys the node's own clients use: the secret, claiming the admin role.
    fn admin_auth(&self) -> Option<Auth> {
        self.auth.as_ref().map(|auth| Auth {
            keys: auth.keys.clone(),
            role: Role::Admin,
        })
    }
}

/// Runs the node until `shutdown` is raised; returns once every shard has stopped.
pub fn run_node(
    config: &Config,
    cores: &[u32],
    shutdown: &ShutdownSignal,
) -> Result<(), NodeError> {
    let shards = cores.len() as u32;
    let admin_token = config.admin.token().map_err(NodeError::Config)?;
    let auth = server_auth(config)?;
    let (device, plan) = prepare_device(config, shards)?;
    let settings = Arc::new(ShardSettings::new(
        config,
        (device, plan),
        shards,
        shutdown,
        admin_token,
        auth,
    ));
    let results = start_shards(
        cores,
        64,
        shutdown,
        move |ctx: ShardContext<ShardMessage>| {
            let settings = Arc::clone(&settings);
            async move {
                let shard = ctx.shard.0;
                let result = run_shard(&settings, ctx).await;
                if result.is_err() {
                    // One shard that cannot run takes the node down rather than serving partly.
                    settings.stop_all.raise();
                }
                result.map_err(|reason| NodeError::Shard { shard, reason })
            }
        },
    )?;
    results.into_iter().collect()
}

/// Checks that the configuration names one device, and prepares it by its backend: how each
/// shard will reach it.
fn prepare_device(config: &Config, shards: u32) -> Result<(&DeviceSection, DevicePlan), NodeError> {
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
    Ok((device, plan))
}

/// Raft's timings in ticks, from the configuration's milliseconds.
fn raft_timings(config: &Config) -> RaftTimings {
    let tick = Duration::from_millis(config.raft.tick_ms);
    RaftTimings {
        tick,
        election_ticks: (config.raft.election_timeout_ms / config.raft.tick_ms).max(2) as u32,
        heartbeat_ticks: (config.raft.heartbeat_interval_ms / config.raft.tick_ms).max(1) as u32,
    }
}

/// The disk faults the shards' devices inject, when `[fault] injection` is on (announced with
/// a warning); a shared device's file is named so that faults can target it.
fn disk_faults(
    config: &Config,
    device: &DeviceSection,
    plan: &DevicePlan,
    node: u64,
) -> Option<Arc<DiskFaults>> {
    config.fault.injection.then(|| {
        let file = match plan {
            DevicePlan::Shared { .. } => config.device_path(device),
            DevicePlan::PerShardMemory { .. } => None,
        };
        tracing::warn!(node, "fault injection is on: POST /fault arms disk faults");
        DiskFaults::new(config.fault.seed, file)
    })
}

/// Runs one shard until shutdown: binds its memory, opens its device and its server, binds
/// its listeners, serves the other shards (and, on shard 0, the metrics endpoint), then
/// serves its copysets.
async fn run_shard(
    settings: &ShardSettings,
    mut ctx: ShardContext<ShardMessage>,
) -> Result<(), String> {
    let (node, shard) = (settings.node, ctx.shard.0);
    if let Some(numa) = settings.numa_node {
        ffi::numa::bind_thread_memory(numa)
            .map_err(|e| format!("binding memory to NUMA node {numa}: {e}"))?;
        info!(node, shard, numa, "shard memory bound to its NUMA node");
    }
    let (bdev, device_shard) = open_device(settings, shard).await?;
    let server = open_server(settings, shard, bdev, device_shard).await?;
    let net = NetContext {
        auth: settings.auth.clone().map(Rc::new),
        ..NetContext::from_section(&settings.net)
    };
    server.set_net(net.clone());
    let (peer, clients) = bind_listeners(settings, shard, &net).await?;
    // Answer other shards' scrapes and serve the requests they forward.
    serve_other_shards(&server, ctx.mesh.take_receivers());
    let mesh = Rc::new(ctx.mesh);
    server.set_mesh(Rc::clone(&mesh));
    // The endpoint's and the heartbeat's tasks are waited for once the shard stopped: their
    // sockets close before the executor ends (a listener left open would keep the port).
    let mut background = Vec::new();
    if let (0, Some(address)) = (shard, settings.metrics_address) {
        background.push(serve_metrics_endpoint(
            settings,
            address,
            &server,
            &mesh,
            &ctx.shutdown,
        )?);
    }
    if shard == 0 {
        let heartbeats = super::heartbeat::heartbeat_loop(
            HeartbeatSettings {
                node: settings.node,
                interval: settings.placement.heartbeat,
                zone: settings.placement.zone.clone(),
                host: settings.placement.host.clone(),
                nodes: settings.placement.nodes.clone(),
                net: settings.net.clone(),
                auth: settings.admin_auth(),
            },
            Rc::clone(&server),
            Rc::clone(&mesh),
            ctx.shutdown.clone(),
        );
        background.push(glommio::spawn_local(heartbeats).detach());
    }
    info!(node, shard, core = ctx.core, "shard serving");
    server.run(peer, clients, ctx.shutdown.clone()).await;
    for task in background {
        let _ = task.await;
    }
    Ok(())
}

/// Opens the shard's device: a memory device of its own, formatted now, or the shared
/// device; behind the fault injector when that is on. Gives it with the shard's index on it.
async fn open_device(settings: &ShardSettings, shard: u32) -> Result<(AnyBdev, u32), String> {
    let (uri, device_shard, fresh_memory) = match &settings.plan {
        DevicePlan::Shared { uri } => (uri.clone(), shard, false),
        DevicePlan::PerShardMemory { size } => (format!("mem://?size={size}"), 0, true),
    };
    let bdev = bdev::open(&uri, POOL_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    if fresh_memory {
        let options = FormatOptions {
            device_is_zeroed: true,
            ..settings.storage.format_options(1)
        };
        format(
            &bdev,
            &options,
            device_uuid(settings.node ^ u64::from(shard)),
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    #[cfg(feature = "spdk")]
    if let AnyBdev::Spdk(spdk) = &bdev {
        glommio::spawn_local(spdk.idle_poller()).detach();
    }
    let bdev = match &settings.faults {
        Some(faults) => {
            AnyBdev::Injected(Box::new(InjectedBdev::new(bdev, Arc::clone(faults), shard)))
        }
        None => bdev,
    };
    Ok((bdev, device_shard))
}

/// Opens the shard's engine on `bdev` (shard `device_shard` of it), which recovers its
/// copysets, and the shard's server over it.
async fn open_server(
    settings: &ShardSettings,
    shard: u32,
    bdev: AnyBdev,
    device_shard: u32,
) -> Result<Rc<ShardServer<AnyBdev>>, String> {
    let node = settings.node;
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
        settings.cluster.clone(),
        settings.timings,
        settings.collect_metrics,
    )
    .map_err(|e| e.to_string())?;
    server.set_trace_every(settings.trace_every);
    server.set_admin_token(settings.admin_token.as_deref());
    server.set_placement_timing(
        settings.placement.heartbeat,
        settings.placement.offline_after,
    );
    server.set_install_pace(settings.placement.recovery_bytes_per_s);
    server.set_scheduler(
        &settings.placement.nodes,
        settings.placement.limits,
        (
            settings.placement.balance_leaders,
            settings.placement.balance_copysets,
        ),
        crate::client::ClientConfig {
            deadline: Duration::from_secs(30),
            net: settings.net.clone(),
            auth: settings.admin_auth(),
            ..crate::client::ClientConfig::default()
        },
    );
    server.set_scrubber(
        &settings.placement.nodes,
        settings.placement.scrub,
        crate::client::ClientConfig {
            deadline: Duration::from_secs(30),
            net: settings.net.clone(),
            auth: settings.admin_auth(),
            ..crate::client::ClientConfig::default()
        },
    );
    Ok(server)
}

/// Binds the shard's peer listener, then its client listeners.
async fn bind_listeners(
    settings: &ShardSettings,
    shard: u32,
    net: &NetContext,
) -> Result<(Listener, Vec<Listener>), String> {
    let peer = Listener::bind_shard(&settings.peer_endpoint, shard, net)
        .await
        .map_err(|e| e.to_string())?;
    let mut clients = Vec::new();
    for endpoint in &settings.client_endpoints {
        clients.push(
            Listener::bind_shard(endpoint, shard, net)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    Ok((peer, clients))
}

/// Drains the mesh's `receivers`, one task each: answers the other shards' scrapes and serves
/// the requests they forward.
fn serve_other_shards<B: Bdev + 'static>(
    server: &Rc<ShardServer<B>>,
    receivers: Vec<(ShardId, ConnectedReceiver<ShardMessage>)>,
) {
    for (_, receiver) in receivers {
        let server = Rc::clone(server);
        glommio::spawn_local(async move {
            while let Some(message) = receiver.recv().await {
                match message {
                    ShardMessage::Scrape(reply) => {
                        let reply = reply.connect().await;
                        let report = server.report();
                        // The scraper may have given up; nothing to do then.
                        let _ = reply.send(report).await;
                    }
                    ShardMessage::Forward(forwarded) => {
                        let server = Rc::clone(&server);
                        glommio::spawn_local(
                            async move { server.serve_forwarded(forwarded).await },
                        )
                        .detach();
                    }
                }
            }
        })
        .detach();
    }
}

/// Serves the node's `/metrics` and `/status` (and `/fault` when fault injection is on) at
/// `address` from this shard, until `stop`; the task that serves it.
fn serve_metrics_endpoint<B: Bdev + 'static>(
    settings: &ShardSettings,
    address: SocketAddr,
    server: &Rc<ShardServer<B>>,
    mesh: &Rc<crate::shard::Mesh<ShardMessage>>,
    stop: &ShutdownSignal,
) -> Result<glommio::task::JoinHandle<()>, String> {
    let node = settings.node;
    let listener = crate::metrics::http::bind(address)
        .map_err(|e| format!("metrics endpoint {address}: {e}"))?;
    let mut pages = metrics_pages(node, Rc::clone(server), Rc::clone(mesh));
    pages.tokens = settings.http_tokens();
    if let Some(faults) = &settings.faults {
        let faults = Arc::clone(faults);
        pages.fault = Some(Box::new(move |query: &str| {
            crate::storage::bdev::inject::control(&faults, query)
        }));
    }
    let stop = stop.clone();
    let serving =
        glommio::spawn_local(crate::metrics::http::serve(listener, Rc::new(pages), stop)).detach();
    info!(node, %address, "metrics endpoint serving /metrics and /status");
    Ok(serving)
}

/// Creates `dir` and its missing parents readable by this user alone (0700); directories that
/// exist keep their modes (they are the operator's).
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
}
