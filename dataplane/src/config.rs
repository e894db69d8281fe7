//! The process configuration: one TOML file per process (one process per NUMA node).
//!
//! Reading happens in two steps. `serde` turns the text into [`Config`], rejecting unknown keys
//! and values of the wrong shape; [`Config::validate`] then checks what the types cannot say
//! (cores that exist on this host, sizes that are multiples of the page size, timings that make
//! sense together). Every error is one line naming the file, the key and the problem.
//!
//! Every default lives in [`defaults`]; `docs/operations.md` documents each key, and a test
//! keeps the two in step.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::storage::engine::FormatOptions;
pub use crate::units::ByteSize;

/// Every default value of the configuration, in one place.
pub mod defaults {
    /// NUMA node the process binds its memory to.
    pub const NUMA_NODE: u32 = 0;
    /// Where the process keeps its files (device images of the `uring` backend, sockets).
    pub const DATA_DIR: &str = "/var/lib/chunkserver";
    /// Chunk size: the unit of placement and of the chunk pool's slots.
    pub const CHUNK_SIZE: u64 = 16 << 20;
    /// Page size: the unit of I/O alignment and of copy-on-write snapshots.
    pub const PAGE_SIZE: u64 = 4 << 10;
    /// Size of each shard's WAL ring.
    pub const WAL_SIZE_PER_SHARD: u64 = 256 << 20;
    /// Copysets one shard can hold (fixed when the device is formatted).
    pub const MAX_COPYSETS_PER_SHARD: u32 = 256;
    /// Raft logical clock tick.
    pub const TICK_MS: u64 = 10;
    /// Base election timeout; the effective timeout is randomized in [base, 2 * base).
    pub const ELECTION_TIMEOUT_MS: u64 = 1000;
    /// Interval between leader heartbeats.
    pub const HEARTBEAT_INTERVAL_MS: u64 = 100;
    /// Leader lease: how long after a quorum acknowledgement the leader serves lease reads.
    pub const LEASE_MS: u64 = 800;
    /// Log level when RUST_LOG is not set.
    pub const LOG_LEVEL: &str = "info";
    /// Log format.
    pub const LOG_FORMAT: &str = "text";
    /// Trace one request in this many with a span through the request path (0: none).
    pub const LOG_TRACE_EVERY: u64 = 0;
}

/// One process's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Who this process is and where it runs.
    pub node: NodeSection,
    /// Where it listens.
    pub listen: ListenSection,
    /// The other members of the cluster (empty for a single node).
    #[serde(default)]
    pub cluster: ClusterSection,
    /// The devices it stores chunks on; at least one.
    #[serde(default)]
    pub devices: Vec<DeviceSection>,
    /// Layout parameters of the storage engine.
    #[serde(default)]
    pub storage: StorageSection,
    /// Raft timings.
    #[serde(default)]
    pub raft: RaftSection,
    /// Metrics endpoint.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// Fault injection, for the fault suite only.
    #[serde(default, skip_serializing_if = "FaultSection::is_default")]
    pub fault: FaultSection,
    /// The SPDK environment, for `spdk` devices.
    #[serde(default, skip_serializing_if = "SpdkSection::is_default")]
    pub spdk: SpdkSection,
}

/// `[spdk]`: how the SPDK environment starts (only with `spdk` devices; feature `spdk`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpdkSection {
    /// Memory SPDK reserves: DMA buffers (each shard's pool), malloc bdevs, the bdev layer.
    pub mem_size: ByteSize,
    /// Take that memory from hugepages (production). `false` is the no-huge test mode:
    /// ordinary memory without physical addresses, enough for malloc, aio and uring bdevs but
    /// not for NVMe.
    pub hugepages: bool,
    /// Scan the PCI bus and claim NVMe devices bound to vfio-pci or uio (needed for `pcie`
    /// devices; off otherwise so nothing on the bus is touched).
    pub pci: bool,
    /// An SPDK JSON config (`{"subsystems": [...]}`) that defines the bdevs; relative paths are
    /// under `node.data_dir`. Without it, each device's `create` defines its bdev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_file: Option<PathBuf>,
    /// Format a device that holds no chunkserver format. Off: only a bdev this process made
    /// fresh (a malloc bdev, a file it created) is formatted, so an NVMe drive holding other
    /// data is refused rather than overwritten.
    pub format: bool,
}

impl Default for SpdkSection {
    fn default() -> Self {
        SpdkSection {
            mem_size: ByteSize(1 << 30),
            hugepages: true,
            pci: false,
            config_file: None,
            format: false,
        }
    }
}

impl SpdkSection {
    fn is_default(&self) -> bool {
        *self == SpdkSection::default()
    }
}

/// How an `spdk` device's bdev comes to exist when no `spdk.config_file` defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpdkCreate {
    /// A malloc bdev of the device's `size` (memory; for tests and the demo).
    Malloc,
    /// An aio bdev over the file or block device `path`. (SPDK's uring bdev is not linked:
    /// glommio brings its own liburing; see ffi/build.rs.)
    Aio,
    /// The NVMe controller at PCIe address `pcie`; the bdev is its namespace 1, named
    /// `CONTROLLERn1`, so `bdev` must end in `n1`.
    Nvme,
}

/// `[fault]`: fault injection for tests. With `injection = true` every shard's device goes
/// through the fault injector (storage::bdev::inject), armed at run time with `POST /fault` on the
/// metrics endpoint. Writes then cost a read more; never on for real data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSection {
    /// Wrap the devices in the fault injector and accept `POST /fault`.
    pub injection: bool,
    /// Seed of the injector's decisions (which operations fail, what a power cut keeps).
    pub seed: u64,
}

impl FaultSection {
    fn is_default(&self) -> bool {
        *self == FaultSection::default()
    }
}

/// `[node]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Cluster-wide node id, not 0.
    pub id: u32,
    /// NUMA node whose memory and (with `cores = "numa"`) cores the process uses.
    #[serde(default = "default_numa_node")]
    pub numa_node: u32,
    /// Cores to run shards on, one shard per core.
    pub cores: CoreSpec,
    /// Directory for the process's files.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

/// `[listen]`: listener addresses. Shard `i` of the process listens on the port plus `i`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// Replication traffic between chunkservers.
    pub peer: Endpoint,
    /// Client traffic; one listener per entry (for example one `tcp://` and one `rdma://`).
    pub client: Vec<Endpoint>,
}

/// `[cluster]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Every member, this node included.
    #[serde(default)]
    pub nodes: Vec<ClusterNode>,
}

/// `[[cluster.nodes]]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNode {
    /// The member's node id.
    pub id: u32,
    /// Its peer listener.
    pub peer: Endpoint,
    /// Its client listeners.
    pub client: Vec<Endpoint>,
    /// How many shards (cores) it runs.
    pub shards: u32,
}

/// Which storage backend a device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Kernel io_uring with O_DIRECT on a file or a block device.
    Uring,
    /// An SPDK bdev (needs the `spdk` feature).
    Spdk,
    /// Memory, like SPDK's malloc bdev: for tests and the demo.
    Mem,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Uring => "uring",
            Backend::Spdk => "spdk",
            Backend::Mem => "mem",
        })
    }
}

/// `[[devices]]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// The backend.
    pub backend: Backend,
    /// File or block device (`uring` only). Relative paths are under `node.data_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// SPDK bdev name (`spdk` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bdev: Option<String>,
    /// Size in bytes. Required for `mem` and for a `uring` file that does not exist yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// `spdk` only: how the bdev is made, when no `spdk.config_file` defines it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<SpdkCreate>,
    /// `spdk` with `create = "nvme"`: the controller's PCIe address, as in `0000:5e:00.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie: Option<String>,
}

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// Chunk size, a multiple of the page size.
    pub chunk_size: ByteSize,
    /// Page size, a power of two from 512 B to 64 KiB.
    pub page_size: ByteSize,
    /// WAL ring size per shard, a multiple of the page size.
    pub wal_size_per_shard: ByteSize,
    /// Copysets one shard can hold; fixed when the device is formatted.
    pub max_copysets_per_shard: u32,
}

impl StorageSection {
    /// The engine's format options for a device of `shard_count` shards.
    pub fn format_options(&self, shard_count: u32) -> FormatOptions {
        FormatOptions {
            page_size: self.page_size.bytes() as u32,
            chunk_size: self.chunk_size.bytes(),
            wal_size: self.wal_size_per_shard.bytes(),
            shard_count,
            max_copysets: self.max_copysets_per_shard,
            device_is_zeroed: false,
        }
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            chunk_size: ByteSize(defaults::CHUNK_SIZE),
            page_size: ByteSize(defaults::PAGE_SIZE),
            wal_size_per_shard: ByteSize(defaults::WAL_SIZE_PER_SHARD),
            max_copysets_per_shard: defaults::MAX_COPYSETS_PER_SHARD,
        }
    }
}

/// `[raft]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSection {
    /// Logical clock tick; the other timings are multiples of it.
    pub tick_ms: u64,
    /// Base election timeout.
    pub election_timeout_ms: u64,
    /// Heartbeat interval.
    pub heartbeat_interval_ms: u64,
    /// Leader lease, shorter than the election timeout.
    pub lease_ms: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            tick_ms: defaults::TICK_MS,
            election_timeout_ms: defaults::ELECTION_TIMEOUT_MS,
            heartbeat_interval_ms: defaults::HEARTBEAT_INTERVAL_MS,
            lease_ms: defaults::LEASE_MS,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// HTTP address of the Prometheus endpoint; none means no endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    /// Whether shards collect metrics at all (off: the instruments record nothing, to
    /// measure what collecting costs).
    pub collect: bool,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            address: None,
            collect: true,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `error`, `warn`, `info`, `debug` or `trace`; RUST_LOG overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
    /// Follow one service request in this many through the request path with a `request`
    /// span and its events (receive, propose, apply, reply), at `info`; 0 traces none.
    pub trace_every: u64,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: defaults::LOG_LEVEL.into(),
            format: defaults::LOG_FORMAT.into(),
            trace_every: defaults::LOG_TRACE_EVERY,
        }
    }
}

fn default_numa_node() -> u32 {
    defaults::NUMA_NODE
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(defaults::DATA_DIR)
}

/// A transport named by an address scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// Verbs semantics emulated in user space over a socket.
    SoftRdma,
    /// Real ibverbs (needs the `rdma` feature).
    Rdma,
}

impl Transport {
    /// The URI scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::SoftRdma => "softrdma",
            Transport::Rdma => "rdma",
        }
    }
}

/// A listener or peer address: `tcp://127.0.0.1:7100`, `softrdma://…`, `rdma://…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The transport.
    pub transport: Transport,
    /// IP address and base port.
    pub addr: SocketAddr,
}

impl Endpoint {
    /// The address of shard `shard`: the base port plus the shard index.
    pub fn for_shard(&self, shard: u32) -> Option<SocketAddr> {
        let port = u32::from(self.addr.port()).checked_add(shard)?;
        let port = u16::try_from(port).ok()?;
        Some(SocketAddr::new(self.addr.ip(), port))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.transport.scheme(), self.addr)
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            format!(
                "`{text}` is not an address of the form tcp://IP:PORT, softrdma://… or rdma://…"
            )
        })?;
        let transport = match scheme {
            "tcp" => Transport::Tcp,
            "softrdma" => Transport::SoftRdma,
            "rdma" => Transport::Rdma,
            other => {
                return Err(format!(
                    "unknown transport `{other}` in `{text}` (expected tcp, softrdma or rdma)"
                ))
            }
        };
        let addr = rest
            .parse::<SocketAddr>()
            .map_err(|_| format!("`{rest}` in `{text}` is not an IP:PORT socket address"))?;
        Ok(Endpoint { transport, addr })
    }
}

impl Serialize for Endpoint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The cores to run on: a list (`[0, 1]`), a Linux cpulist string (`"0-7,16-23"`), or `"numa"`
/// for every online core of `node.numa_node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreSpec {
    /// Explicit core ids.
    List(Vec<u32>),
    /// Every online core of the configured NUMA node.
    Numa,
}

impl Serialize for CoreSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            CoreSpec::List(cores) => cores.serialize(serializer),
            CoreSpec::Numa => serializer.serialize_str("numa"),
        }
    }
}

impl<'de> Deserialize<'de> for CoreSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            List(Vec<u32>),
            Text(String),
        }
        let raw = Raw::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom(
                "expected a list of core ids, a cpulist such as \"0-3\", or \"numa\"",
            )
        })?;
        match raw {
            Raw::List(cores) => Ok(CoreSpec::List(cores)),
            Raw::Text(text) if text == "numa" => Ok(CoreSpec::Numa),
            Raw::Text(text) => parse_cpulist(&text)
                .map(CoreSpec::List)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parses the Linux cpulist syntax: `0-3,8,10-11`.
pub fn parse_cpulist(text: &str) -> Result<Vec<u32>, String> {
    let mut cores = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.trim().is_empty()) {
        let bad = || format!("`{text}` is not a cpulist such as \"0-3,8\"");
        match part.split_once('-') {
            Some((low, high)) => {
                let low: u32 = low.trim().parse().map_err(|_| bad())?;
                let high: u32 = high.trim().parse().map_err(|_| bad())?;
                if low > high || high - low > 4096 {
                    return Err(bad());
                }
                cores.extend(low..=high);
            }
            None => cores.push(part.trim().parse().map_err(|_| bad())?),
        }
    }
    Ok(cores)
}

/// What the host offers, as far as validation needs to know. Tests build their own.
#[derive(Debug, Clone)]
pub struct HostTopology {
    /// Online cores.
    pub online_cores: BTreeSet<u32>,
    /// NUMA nodes and their online cores; a host without NUMA has node 0 with every core.
    pub numa_nodes: Vec<(u32, BTreeSet<u32>)>,
}

impl HostTopology {
    /// Reads the topology of this host from sysfs, falling back to `available_parallelism`.
    pub fn detect() -> HostTopology {
        let online_cores: BTreeSet<u32> =
            match std::fs::read_to_string("/sys/devices/system/cpu/online") {
                Ok(text) => parse_cpulist(&text)
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
                Err(_) => BTreeSet::new(),
            };
        let online_cores = if online_cores.is_empty() {
            let count = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            (0..count as u32).collect()
        } else {
            online_cores
        };
        let mut numa_nodes = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/sys/devices/system/node") {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_prefix("node")) else {
                    continue;
                };
                let Ok(id) = id.parse::<u32>() else { continue };
                let cores = std::fs::read_to_string(entry.path().join("cpulist"))
                    .ok()
                    .and_then(|t| parse_cpulist(&t).ok())
                    .unwrap_or_default();
                numa_nodes.push((
                    id,
                    cores
                        .into_iter()
                        .filter(|c| online_cores.contains(c))
                        .collect(),
                ));
            }
        }
        if numa_nodes.is_empty() {
            numa_nodes.push((0, online_cores.clone()));
        }
        numa_nodes.sort_by_key(|(id, _)| *id);
        HostTopology {
            online_cores,
            numa_nodes,
        }
    }

    fn numa_cores(&self, node: u32) -> Option<&BTreeSet<u32>> {
        self.numa_nodes
            .iter()
            .find(|(id, _)| *id == node)
            .map(|(_, cores)| cores)
    }
}

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `<embedded>` for built-in configurations).
    pub file: PathBuf,
    /// The dotted key (`storage.chunk_size`), or `line N` for a syntax error.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The settled facts derived from a valid configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The cores the shards run on, in shard order.
    pub cores: Vec<u32>,
}

impl Config {
    /// Reads and validates a file against this host.
    pub fn load(path: &Path) -> Result<(Config, Resolved), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            key: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        let config = Config::parse(path, &text)?;
        let resolved = config.validate(path, &HostTopology::detect())?;
        Ok((config, resolved))
    }

    /// Parses TOML text; `file` only names the source in errors.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            let path = error.path().to_string();
            let inner = error.into_inner();
            let message = inner.message().to_string();
            let key = if path.is_empty() || path == "." {
                match inner.span() {
                    Some(span) => format!("line {}", 1 + text[..span.start].matches('\n').count()),
                    None => "(document)".into(),
                }
            } else {
                path
            };
            ConfigError {
                file: file.to_path_buf(),
                key,
                message,
            }
        })
    }

    /// Checks everything the types cannot, against the given host.
    pub fn validate(&self, file: &Path, host: &HostTopology) -> Result<Resolved, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: file.to_path_buf(),
            key: key.to_string(),
            message,
        };

        if self.node.id == 0 {
            return Err(err("node.id", "must not be 0".into()));
        }
        if self.fault.injection && self.metrics.address.is_none() {
            return Err(err(
                "fault.injection",
                "needs metrics.address: faults are armed with POST /fault on the metrics endpoint"
                    .into(),
            ));
        }
        let Some(numa_cores) = host.numa_cores(self.node.numa_node) else {
            let nodes: Vec<String> = host
                .numa_nodes
                .iter()
                .map(|(id, _)| id.to_string())
                .collect();
            return Err(err(
                "node.numa_node",
                format!(
                    "NUMA node {} does not exist on this host (it has {})",
                    self.node.numa_node,
                    nodes.join(", ")
                ),
            ));
        };
        let cores: Vec<u32> = match &self.node.cores {
            CoreSpec::Numa => numa_cores.iter().copied().collect(),
            CoreSpec::List(list) => list.clone(),
        };
        if cores.is_empty() {
            return Err(err("node.cores", "names no core".into()));
        }
        let mut seen = BTreeSet::new();
        for &core in &cores {
            if !host.online_cores.contains(&core) {
                return Err(err(
                    "node.cores",
                    format!(
                        "core {core} does not exist on this host (online: {})",
                        cpulist(&host.online_cores)
                    ),
                ));
            }
            if !seen.insert(core) {
                return Err(err("node.cores", format!("core {core} is listed twice")));
            }
        }

        if self.listen.client.is_empty() {
            return Err(err("listen.client", "names no listener".into()));
        }
        for (key, endpoint) in std::iter::once(("listen.peer", &self.listen.peer))
            .chain(self.listen.client.iter().map(|e| ("listen.client", e)))
        {
            if endpoint.addr.port() == 0 {
                return Err(err(key, format!("`{endpoint}` needs a port other than 0")));
            }
            if endpoint.for_shard(cores.len() as u32 - 1).is_none() {
                return Err(err(
                    key,
                    format!(
                        "`{endpoint}`: port plus {} shards passes 65535",
                        cores.len()
                    ),
                ));
            }
            if endpoint.transport == Transport::Rdma && !cfg!(feature = "rdma") {
                return Err(err(
                    key,
                    format!(
                        "`{endpoint}` needs the rdma feature, which this binary was built without"
                    ),
                ));
            }
        }

        if !self.cluster.nodes.is_empty() {
            let mut ids = BTreeSet::new();
            for node in &self.cluster.nodes {
                if node.id == 0 || !ids.insert(node.id) {
                    return Err(err(
                        "cluster.nodes",
                        format!("node id {} is 0 or listed twice", node.id),
                    ));
                }
                if node.shards == 0 {
                    return Err(err(
                        "cluster.nodes",
                        format!("node {} has 0 shards", node.id),
                    ));
                }
            }
            match self.cluster.nodes.iter().find(|n| n.id == self.node.id) {
                None => {
                    return Err(err(
                        "cluster.nodes",
                        format!("does not list this node (node.id = {})", self.node.id),
                    ))
                }
                Some(me) if me.shards as usize != cores.len() => {
                    return Err(err(
                        "cluster.nodes",
                        format!(
                            "lists this node with {} shards but node.cores has {}",
                            me.shards,
                            cores.len()
                        ),
                    ))
                }
                Some(me) if me.peer != self.listen.peer => {
                    return Err(err(
                        "cluster.nodes",
                        format!(
                            "lists this node's peer address as {} but listen.peer is {}",
                            me.peer, self.listen.peer
                        ),
                    ))
                }
                Some(_) => {}
            }
        }

        let page = self.storage.page_size.bytes();
        if !page.is_power_of_two() || !(512..=65536).contains(&page) {
            return Err(err(
                "storage.page_size",
                format!(
                    "{} is not a power of two from 512 B to 64 KiB",
                    self.storage.page_size
                ),
            ));
        }
        for (key, size) in [
            ("storage.chunk_size", self.storage.chunk_size),
            (
                "storage.wal_size_per_shard",
                self.storage.wal_size_per_shard,
            ),
        ] {
            if size.bytes() == 0 || size.bytes() % page != 0 {
                return Err(err(
                    key,
                    format!(
                        "{} ({} bytes) is not a non-zero multiple of the page size ({})",
                        size,
                        size.bytes(),
                        self.storage.page_size
                    ),
                ));
            }
        }
        if !(1..=65_536).contains(&self.storage.max_copysets_per_shard) {
            return Err(err(
                "storage.max_copysets_per_shard",
                format!(
                    "{} is not from 1 to 65536",
                    self.storage.max_copysets_per_shard
                ),
            ));
        }
        if self.storage.wal_size_per_shard.bytes() < 16 * page {
            return Err(err(
                "storage.wal_size_per_shard",
                format!(
                    "{} is smaller than 16 pages",
                    self.storage.wal_size_per_shard
                ),
            ));
        }
        // The ring must take the largest request a volume sends (1 MiB of data and its
        // headers) beside the room raft's own records keep (docs/architecture.md, "WAL space").
        let budget =
            crate::storage::wal::WalBudget::for_ring(self.storage.wal_size_per_shard.bytes(), page);
        let piece = (1 << 20) + 1024;
        if budget.largest_admissible() < piece {
            let mut enough = self.storage.wal_size_per_shard.bytes();
            while crate::storage::wal::WalBudget::for_ring(enough, page).largest_admissible()
                < piece
            {
                enough *= 2;
            }
            return Err(err(
                "storage.wal_size_per_shard",
                format!(
                    "{} cannot take a 1 MiB write beside the room raft's own records keep; use \
                     at least {}",
                    self.storage.wal_size_per_shard,
                    ByteSize(enough)
                ),
            ));
        }

        if self.devices.is_empty() {
            return Err(err(
                "devices",
                "names no device; add a [[devices]] table".into(),
            ));
        }
        let minimum = page
            + cores.len() as u64 * self.storage.wal_size_per_shard.bytes()
            + self.storage.chunk_size.bytes();
        for (i, device) in self.devices.iter().enumerate() {
            let key = |field: &str| format!("devices[{i}].{field}");
            match device.backend {
                Backend::Uring | Backend::Mem
                    if device.create.is_some() || device.pcie.is_some() =>
                {
                    return Err(err(
                        &key("create"),
                        "only the spdk backend takes `create` and `pcie`".into(),
                    ));
                }
                Backend::Uring => {
                    if device.path.is_none() {
                        return Err(err(&key("path"), "the uring backend needs a path".into()));
                    }
                    if device.bdev.is_some() {
                        return Err(err(
                            &key("bdev"),
                            "only the spdk backend takes a bdev name".into(),
                        ));
                    }
                }
                Backend::Spdk => {
                    let Some(bdev) = &device.bdev else {
                        return Err(err(
                            &key("bdev"),
                            "the spdk backend needs a bdev name".into(),
                        ));
                    };
                    if !cfg!(feature = "spdk") {
                        return Err(err(
                            &key("backend"),
                            "spdk needs the spdk feature, which this binary was built without"
                                .into(),
                        ));
                    }
                    match (device.create, &self.spdk.config_file) {
                        (None, None) => {
                            return Err(err(
                                &key("create"),
                                "say how the bdev is made (malloc, aio, nvme), or name \
                                 an SPDK JSON config in spdk.config_file"
                                    .into(),
                            ))
                        }
                        (Some(_), Some(_)) => {
                            return Err(err(
                                &key("create"),
                                "spdk.config_file defines the bdevs; drop `create`".into(),
                            ))
                        }
                        (Some(SpdkCreate::Malloc), None) if device.size.is_none() => {
                            return Err(err(&key("size"), "a malloc bdev needs a size".into()))
                        }
                        (Some(SpdkCreate::Aio), None) if device.path.is_none() => {
                            return Err(err(&key("path"), "an aio bdev needs a path".into()))
                        }
                        (Some(SpdkCreate::Nvme), None) => {
                            if device.pcie.is_none() {
                                return Err(err(
                                    &key("pcie"),
                                    "an nvme bdev needs a PCIe address".into(),
                                ));
                            }
                            if !bdev.ends_with("n1") || bdev.len() < 3 {
                                return Err(err(
                                    &key("bdev"),
                                    "an nvme bdev is the controller's namespace 1: name it \
                                     CONTROLLERn1, as in Nvme0n1"
                                        .into(),
                                ));
                            }
                            if !self.spdk.pci {
                                return Err(err(
                                    "spdk.pci",
                                    "an nvme device needs spdk.pci = true".into(),
                                ));
                            }
                        }
                        _ => {}
                    }
                }
                Backend::Mem => {
                    if device.size.is_none() {
                        return Err(err(&key("size"), "the mem backend needs a size".into()));
                    }
                    if device.path.is_some() || device.bdev.is_some() {
                        return Err(err(
                            &key("backend"),
                            "the mem backend takes neither a path nor a bdev".into(),
                        ));
                    }
                }
            }
            if let Some(size) = device.size {
                if size.bytes() % page != 0 {
                    return Err(err(
                        &key("size"),
                        format!(
                            "{} ({} bytes) is not a multiple of the page size ({})",
                            size,
                            size.bytes(),
                            self.storage.page_size
                        ),
                    ));
                }
                if size.bytes() < minimum {
                    return Err(err(
                        &key("size"),
                        format!(
                            "{} cannot hold a superblock, {} WAL rings of {} and one chunk of {}",
                            size,
                            cores.len(),
                            self.storage.wal_size_per_shard,
                            self.storage.chunk_size
                        ),
                    ));
                }
            }
        }

        let raft = &self.raft;
        if raft.tick_ms == 0 {
            return Err(err("raft.tick_ms", "must not be 0".into()));
        }
        for (key, value) in [
            ("raft.election_timeout_ms", raft.election_timeout_ms),
            ("raft.heartbeat_interval_ms", raft.heartbeat_interval_ms),
            ("raft.lease_ms", raft.lease_ms),
        ] {
            if value == 0 || value % raft.tick_ms != 0 {
                return Err(err(
                    key,
                    format!(
                        "{value} is not a non-zero multiple of raft.tick_ms ({})",
                        raft.tick_ms
                    ),
                ));
            }
        }
        if raft.heartbeat_interval_ms * 2 > raft.election_timeout_ms {
            return Err(err(
                "raft.heartbeat_interval_ms",
                format!(
                    "{} is more than half the election timeout ({})",
                    raft.heartbeat_interval_ms, raft.election_timeout_ms
                ),
            ));
        }
        if raft.lease_ms >= raft.election_timeout_ms {
            return Err(err("raft.lease_ms", format!("{} must be shorter than the election timeout ({}) so that a lease ends before a new leader can be elected", raft.lease_ms, raft.election_timeout_ms)));
        }

        if !["error", "warn", "info", "debug", "trace"].contains(&self.log.level.as_str()) {
            return Err(err(
                "log.level",
                format!(
                    "`{}` is not one of error, warn, info, debug, trace",
                    self.log.level
                ),
            ));
        }
        if !["text", "json"].contains(&self.log.format.as_str()) {
            return Err(err(
                "log.format",
                format!("`{}` is not text or json", self.log.format),
            ));
        }

        Ok(Resolved { cores })
    }

    /// The path of a device file, resolved against `node.data_dir`.
    pub fn device_path(&self, device: &DeviceSection) -> Option<PathBuf> {
        device.path.as_ref().map(|p| {
            if p.is_absolute() {
                p.clone()
            } else {
                self.node.data_dir.join(p)
            }
        })
    }
}

fn cpulist(cores: &BTreeSet<u32>) -> String {
    let cores: Vec<u32> = cores.iter().copied().collect();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cores.len() {
        let start = cores[i];
        let mut end = start;
        while i + 1 < cores.len() && cores[i + 1] == end + 1 {
            i += 1;
            end = cores[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(cores: u32) -> HostTopology {
        let online: BTreeSet<u32> = (0..cores).collect();
        HostTopology {
            online_cores: online.clone(),
            numa_nodes: vec![(0, online)],
        }
    }

    const GOOD: &str = r#"
[node]
id = 1
cores = [0, 1]
data_dir = "/tmp/cs"

[listen]
peer = "tcp://127.0.0.1:7100"
client = ["tcp://127.0.0.1:7200"]

[[devices]]
backend = "mem"
size = "1GiB"
"#;

    fn check(text: &str) -> Result<Resolved, ConfigError> {
        let file = Path::new("test.toml");
        Config::parse(file, text)?.validate(file, &host(2))
    }

    #[test]
    fn a_minimal_file_is_valid_and_takes_the_defaults() {
        let file = Path::new("test.toml");
        let config = Config::parse(file, GOOD).unwrap();
        assert_eq!(config.storage, StorageSection::default());
        assert_eq!(config.raft, RaftSection::default());
        assert_eq!(check(GOOD).unwrap().cores, vec![0, 1]);
    }

    #[test]
    fn an_unknown_key_is_named() {
        let text = GOOD.replace("[[devices]]", "[storage]\nchunk_sise = 4096\n\n[[devices]]");
        let error = check(&text).unwrap_err();
        assert!(error.key.starts_with("storage"), "{error}");
        assert!(error.message.contains("chunk_sise"), "{error}");
        assert!(!error.to_string().contains('\n'));
    }

    #[test]
    fn a_core_that_does_not_exist_is_refused() {
        let error = check(&GOOD.replace("cores = [0, 1]", "cores = [0, 7]")).unwrap_err();
        assert_eq!(error.key, "node.cores");
        assert!(error.message.contains("core 7"), "{error}");
    }

    #[test]
    fn a_bad_address_is_refused() {
        let error = check(&GOOD.replace("tcp://127.0.0.1:7100", "tcp://127.0.0.1")).unwrap_err();
        assert_eq!(error.key, "listen.peer");
        let error =
            check(&GOOD.replace("tcp://127.0.0.1:7200", "udp://127.0.0.1:7200")).unwrap_err();
        assert!(error.key.starts_with("listen.client"), "{error}");
    }

    #[test]
    fn a_size_not_a_multiple_of_the_page_is_refused() {
        let text = GOOD.replace(
            "[[devices]]",
            "[storage]\nchunk_size = 10000\n\n[[devices]]",
        );
        let error = check(&text).unwrap_err();
        assert_eq!(error.key, "storage.chunk_size");
        let error = check(&GOOD.replace("\"1GiB\"", "1073741825")).unwrap_err();
        assert_eq!(error.key, "devices[0].size");
    }

    #[test]
    fn a_wal_too_small_for_a_1_mib_write_is_refused_with_a_size_that_works() {
        let with_wal = |size: &str| {
            GOOD.replace(
                "[[devices]]",
                &format!("[storage]\nwal_size_per_shard = \"{size}\"\n\n[[devices]]"),
            )
        };
        let error = check(&with_wal("8MiB")).unwrap_err();
        assert_eq!(error.key, "storage.wal_size_per_shard");
        assert!(error.to_string().contains("use at least 16MiB"), "{error}");
        check(&with_wal("16MiB")).unwrap();
    }

    #[test]
    fn a_syntax_error_names_the_line() {
        let error = check("[node]\nid = = 1\n").unwrap_err();
        assert_eq!(error.key, "line 2", "{error}");
    }

    #[test]
    fn timings_that_cannot_work_together_are_refused() {
        let text = GOOD.replace("[[devices]]", "[raft]\nlease_ms = 1000\n\n[[devices]]");
        assert_eq!(check(&text).unwrap_err().key, "raft.lease_ms");
        let text = GOOD.replace(
            "[[devices]]",
            "[raft]\nheartbeat_interval_ms = 600\n\n[[devices]]",
        );
        assert_eq!(check(&text).unwrap_err().key, "raft.heartbeat_interval_ms");
    }

    #[test]
    fn cores_accept_a_cpulist_and_numa() {
        assert_eq!(parse_cpulist("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpulist("3-1").is_err());
        let resolved = check(&GOOD.replace("cores = [0, 1]", "cores = \"numa\"")).unwrap();
        assert_eq!(resolved.cores, vec![0, 1]);
        let resolved = check(&GOOD.replace("cores = [0, 1]", "cores = \"1\"")).unwrap();
        assert_eq!(resolved.cores, vec![1]);
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!("16MiB".parse::<ByteSize>().unwrap(), ByteSize(16 << 20));
        assert_eq!("4K".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert!("12XB".parse::<ByteSize>().is_err());
        assert!("99999999999T".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(16 << 20).to_string(), "16MiB");
    }

    #[test]
    fn every_key_is_documented_in_operations_md() {
        let docs = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/operations.md"
        ))
        .unwrap();
        let config = Config::parse(Path::new("test.toml"), GOOD).unwrap();
        let value = toml::Value::try_from(&config).unwrap();
        let mut keys = Vec::new();
        collect_keys("", &value, &mut keys);
        for key in [
            "devices.path",
            "devices.bdev",
            "devices.create",
            "devices.pcie",
            "spdk.mem_size",
            "spdk.hugepages",
            "spdk.pci",
            "spdk.config_file",
            "spdk.format",
            "fault.injection",
            "fault.seed",
            "metrics.address",
            "cluster.nodes.id",
            "cluster.nodes.peer",
            "cluster.nodes.client",
            "cluster.nodes.shards",
        ] {
            keys.push(key.to_string());
        }
        for key in keys {
            assert!(
                docs.contains(&format!("`{key}`")),
                "docs/operations.md does not document `{key}`"
            );
        }
    }

    fn collect_keys(prefix: &str, value: &toml::Value, keys: &mut Vec<String>) {
        match value {
            toml::Value::Table(table) => {
                for (name, inner) in table {
                    let key = if prefix.is_empty() {
                        name.clone()
                    } else {
                        format!("{prefix}.{name}")
                    };
                    if matches!(inner, toml::Value::Table(_) | toml::Value::Array(_))
                        && !is_leaf_array(inner)
                    {
                        collect_keys(&key, inner, keys);
                    } else {
                        keys.push(key);
                    }
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    collect_keys(prefix, item, keys);
                }
            }
            _ => keys.push(prefix.to_string()),
        }
    }

    fn is_leaf_array(value: &toml::Value) -> bool {
        matches!(value, toml::Value::Array(items) if items.iter().all(|i| !matches!(i, toml::Value::Table(_))))
    }
}
