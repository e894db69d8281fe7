//! The process configuration: one TOML file per process (one process per NUMA node).
//!
//! Reading happens in two steps. `serde` turns the text into [`Config`], rejecting unknown keys
//! and values of the wrong shape; [`Config::validate`] then checks what the types cannot say
//! (cores that exist on this host, sizes that are multiples of the page size, timings that make
//! sense together). Every error is one line naming the file, the key and the problem.
//!
//! Every default lives in [`defaults`]; `docs/operations.md` documents each key, and a test
//! keeps the two in step.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::engine::FormatOptions;
pub use crate::units::ByteSize;

mod auth;
mod host;
mod net;
mod validate;
mod values;

pub use auth::AuthSection;
pub use host::HostTopology;
pub use net::NetSection;
pub use values::{parse_cpulist, CoreSpec, Endpoint, Transport};

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
    /// How long opening a connection may take (RDMA set-up included).
    pub const CONNECT_TIMEOUT_MS: u64 = 3_000;
    /// How long a request waits for its response.
    pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
    /// How long one write may take before the connection is declared dead.
    pub const IO_TIMEOUT_MS: u64 = 10_000;
    /// GID index for `rdma://` (RoCE v2 over IPv4).
    pub const RDMA_GID_INDEX: u8 = 1;
    /// Receive buffers posted per RDMA connection.
    pub const RDMA_RECV_RING_DEPTH: u16 = 64;
    /// Landing (and staging) slots per RDMA connection.
    pub const RDMA_LANDING_SLOTS: u16 = 4;
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
    /// Connection timeouts and the RDMA transport's device and rings.
    #[serde(default, skip_serializing_if = "NetSection::is_default")]
    pub net: NetSection,
    /// Who may connect: the cluster secret, or one role's key (none: nobody is asked).
    #[serde(default, skip_serializing_if = "AuthSection::is_default")]
    pub auth: AuthSection,
    /// Fault injection, for the fault suite only.
    #[serde(default, skip_serializing_if = "FaultSection::is_default")]
    pub fault: FaultSection,
    /// The SPDK environment, for `spdk` devices.
    #[serde(default, skip_serializing_if = "SpdkSection::is_default")]
    pub spdk: SpdkSection,
    /// Who may use the disaster-recovery operations.
    #[serde(default, skip_serializing_if = "AdminSection::is_default")]
    pub admin: AdminSection,
    /// How the pool of copysets for striped volumes is laid out.
    #[serde(default, skip_serializing_if = "PlacementSection::is_default")]
    pub placement: PlacementSection,
}

/// `[placement]`: the pool of copysets that striped volumes spread over, planned once (on the
/// first striped volume's creation) over the `[cluster]` nodes and their zone/host labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementSection {
    /// Replicas per pool copyset (1 to 7; at most the number of distinct hosts).
    pub replicas: u8,
    /// Copysets per node the pool aims at: `copysets_per_node × nodes / replicas` copysets.
    pub copysets_per_node: u32,
    /// Bytes per segment of a striped volume: the unit allocated on first write, a multiple of
    /// the chunk size (default: 64 chunks, 1 GiB of 16 MiB chunks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment_size: Option<ByteSize>,
    /// How often this node sends the placement service its heartbeat.
    pub heartbeat_ms: u64,
    /// A node silent this long is offline in the placement service's view (it counts as
    /// unstable after three missed heartbeats); its replicas are then replaced.
    pub offline_after_ms: u64,
    /// Replacements of offline replicas running at once over the cluster.
    pub max_recoveries: u32,
    /// Replacements adding a replica to one node at once.
    pub max_recoveries_per_node: u32,
    /// Whether the placement service balances leaders over the nodes.
    pub balance_leaders: bool,
    /// Whether the placement service balances replicas over the nodes (a node that joins
    /// gets its share of the pool's copysets).
    pub balance_copysets: bool,
    /// MiB per second one shard copies into the replicas the placement service added
    /// (recovery, balancing), so that client I/O keeps its pace (0: unlimited). A replica that
    /// restarts behind its copyset catches up unpaced: the copyset may need it for a quorum.
    pub recovery_mib_per_s: u64,
    /// MiB per second each replica reads for the background scrub, which compares the
    /// replicas of every copyset page by page (0: no background scrub).
    pub scrub_mib_per_s: u64,
    /// How often the background scrub goes over each copyset.
    pub scrub_every_ms: u64,
    /// Whether the background scrub rewrites the pages a replica holds wrong from the majority.
    pub scrub_repair: bool,
}

impl Default for PlacementSection {
    fn default() -> PlacementSection {
        PlacementSection {
            replicas: 3,
            copysets_per_node: 8,
            segment_size: None,
            heartbeat_ms: 5_000,
            offline_after_ms: 600_000,
            max_recoveries: 4,
            max_recoveries_per_node: 2,
            balance_leaders: true,
            balance_copysets: true,
            recovery_mib_per_s: 32,
            scrub_mib_per_s: 16,
            scrub_every_ms: 7 * 24 * 3_600_000,
            scrub_repair: true,
        }
    }
}

impl PlacementSection {
    fn is_default(&self) -> bool {
        *self == PlacementSection::default()
    }

    /// Its heartbeat interval.
    pub fn heartbeat(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.heartbeat_ms)
    }

    /// How long a node may be silent before it counts as offline.
    pub fn offline_after(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.offline_after_ms)
    }

    /// Bytes per segment for chunks of `chunk_size` bytes.
    pub fn segment_bytes(&self, chunk_size: u64) -> u64 {
        self.segment_size
            .map_or(chunk_size.saturating_mul(64), |size| size.bytes())
    }
}

/// `[admin]`: the admin role. Operations that bypass consensus (`RESET_PEERS`) are served
/// only to a request that carries this node's admin token, read from `token_file` at start
/// (at least 16 bytes; surrounding whitespace is not part of it). Without a token file they
/// are refused on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// A file holding the admin token (keep it 0600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// The fewest bytes an admin token may have.
pub const ADMIN_TOKEN_MIN: usize = 16;

impl AdminSection {
    fn is_default(&self) -> bool {
        *self == AdminSection::default()
    }

    /// The admin token, read from `token_file` (`None` without one).
    pub fn token(&self) -> Result<Option<Vec<u8>>, String> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        read_admin_token(path).map(Some)
    }
}

/// Reads an admin token file: its bytes without surrounding whitespace, at least
/// [`ADMIN_TOKEN_MIN`] of them.
pub fn read_admin_token(path: &Path) -> Result<Vec<u8>, String> {
    let text =
        std::fs::read(path).map_err(|e| format!("admin token file {}: {e}", path.display()))?;
    let token = text.trim_ascii().to_vec();
    if token.len() < ADMIN_TOKEN_MIN {
        return Err(format!(
            "admin token file {}: the token has {} bytes, fewer than {ADMIN_TOKEN_MIN}",
            path.display(),
            token.len()
        ));
    }
    Ok(token)
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
    /// Its zone, the failure domain placement spreads replicas over first (default: its
    /// host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The machine it runs on: placement never puts two replicas of a copyset on one host
    /// (default: the IP address of its peer listener).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl ClusterNode {
    /// Its host label: `host`, else the IP address of its peer listener.
    pub fn host_label(&self) -> String {
        self.host
            .clone()
            .unwrap_or_else(|| self.peer.addr.ip().to_string())
    }

    /// Its zone label: `zone`, else its host label.
    pub fn zone_label(&self) -> String {
        self.zone.clone().unwrap_or_else(|| self.host_label())
    }
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

#[cfg(test)]
mod tests;
