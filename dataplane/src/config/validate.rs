//! [`Config::validate`]: what the types cannot check, one function per section or concern. The
//! checks run in a fixed order and the first problem found is the one reported, so a file with
//! several problems always gets the same error.

use std::collections::BTreeSet;
use std::path::Path;

use super::host::HostTopology;
use super::values::{CoreSpec, Transport};
use super::{Backend, Config, ConfigError, DeviceSection, Resolved, SpdkCreate};
use crate::storage::wal::WalBudget;
use crate::units::ByteSize;

/// The largest WAL ring per shard a configuration may ask for (1 PiB): far beyond any device,
/// and small enough that the WAL's space arithmetic cannot overflow.
const WAL_SIZE_MAX: u64 = 1 << 50;

/// A problem one check found: the key and what is wrong. [`Config::validate`] adds the file.
struct Invalid {
    key: String,
    message: String,
}

/// The problem `message` at `key`.
fn err(key: &str, message: String) -> Invalid {
    Invalid {
        key: key.to_string(),
        message,
    }
}

/// The key of `field` in the `i`th `[[devices]]` table.
fn device_key(i: usize, field: &str) -> String {
    format!("devices[{i}].{field}")
}

impl Config {
    /// Checks everything the types cannot, against the given host.
    pub fn validate(&self, file: &Path, host: &HostTopology) -> Result<Resolved, ConfigError> {
        self.check(host)
            .map_err(|Invalid { key, message }| ConfigError {
                file: file.to_path_buf(),
                key,
                message,
            })
    }

    /// Every check, in order: later ones rely on what earlier ones settled (the cores, a page
    /// size that is a power of two).
    fn check(&self, host: &HostTopology) -> Result<Resolved, Invalid> {
        if self.node.id == 0 {
            return Err(err("node.id", "must not be 0".into()));
        }
        self.check_fault()?;
        let cores = self.resolve_cores(host)?;
        self.check_listen(cores.len())?;
        self.check_cluster(cores.len())?;
        self.check_storage()?;
        self.check_wal_room()?;
        self.check_devices(cores.len())?;
        self.check_raft()?;
        self.check_log()?;
        self.net
            .check()
            .map_err(|(key, message)| err(key, message))?;
        self.auth
            .check()
            .map_err(|(key, message)| err(key, message))?;
        self.check_placement()?;
        Ok(Resolved { cores })
    }

    /// `[placement]`: replicas a copyset can have, a segment of whole chunks that one segment
    /// record can place.
    fn check_placement(&self) -> Result<(), Invalid> {
        use crate::placement::tables::{MAX_CHUNKS_PER_SEGMENT, MAX_REPLICAS};
        let placement = &self.placement;
        if placement.replicas == 0 || usize::from(placement.replicas) > MAX_REPLICAS {
            return Err(err(
                "placement.replicas",
                format!("must be 1 to {MAX_REPLICAS}, not {}", placement.replicas),
            ));
        }
        if placement.copysets_per_node == 0 || placement.copysets_per_node > 1024 {
            return Err(err(
                "placement.copysets_per_node",
                format!("must be 1 to 1024, not {}", placement.copysets_per_node),
            ));
        }
        if placement.heartbeat_ms < 10 {
            return Err(err(
                "placement.heartbeat_ms",
                format!("must be at least 10, not {}", placement.heartbeat_ms),
            ));
        }
        if placement.offline_after_ms <= placement.heartbeat_ms.saturating_mul(3) {
            return Err(err(
                "placement.offline_after_ms",
                format!(
                    "must be over three heartbeats ({} ms), not {}",
                    placement.heartbeat_ms.saturating_mul(3),
                    placement.offline_after_ms
                ),
            ));
        }
        self.check_placement_rates()?;
        for (key, value) in [
            ("placement.max_recoveries", placement.max_recoveries),
            (
                "placement.max_recoveries_per_node",
                placement.max_recoveries_per_node,
            ),
        ] {
            if value == 0 || value > 1024 {
                return Err(err(key, format!("must be 1 to 1024, not {value}")));
            }
        }
        let chunk = self.storage.chunk_size.bytes().max(1);
        let segment = placement.segment_bytes(chunk);
        if segment == 0 || segment % chunk != 0 || segment / chunk > MAX_CHUNKS_PER_SEGMENT {
            return Err(err(
                "placement.segment_size",
                format!(
                    "must be 1 to {MAX_CHUNKS_PER_SEGMENT} whole chunks of {chunk} bytes, not \
                     {segment} bytes"
                ),
            ));
        }
        Ok(())
    }

    /// `[placement]`'s paces: the recovery's and the background scrub's, and the scrub's interval.
    fn check_placement_rates(&self) -> Result<(), Invalid> {
        let placement = &self.placement;
        if placement.recovery_mib_per_s > 1 << 20 {
            return Err(err(
                "placement.recovery_mib_per_s",
                format!(
                    "must be at most {} (0: unlimited), not {}",
                    1u64 << 20,
                    placement.recovery_mib_per_s
                ),
            ));
        }
        if placement.scrub_mib_per_s > 1 << 20 {
            return Err(err(
                "placement.scrub_mib_per_s",
                format!(
                    "must be at most {} (0: no background scrub), not {}",
                    1u64 << 20,
                    placement.scrub_mib_per_s
                ),
            ));
        }
        if placement.scrub_every_ms < 1000 {
            return Err(err(
                "placement.scrub_every_ms",
                format!("must be at least 1000, not {}", placement.scrub_every_ms),
            ));
        }
        Ok(())
    }

    /// `[fault]`: injection is armed through the metrics endpoint, so it needs one.
    fn check_fault(&self) -> Result<(), Invalid> {
        if self.fault.injection && self.metrics.address.is_none() {
            return Err(err(
                "fault.injection",
                "needs metrics.address: faults are armed with POST /fault on the metrics endpoint"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `node.numa_node` and `node.cores`: the cores the shards run on, in shard order; each
    /// online on this host and named once.
    fn resolve_cores(&self, host: &HostTopology) -> Result<Vec<u32>, Invalid> {
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
        Ok(cores)
    }

    /// `[listen]`: at least one client listener; every port, plus one per shard, a real port;
    /// `rdma://` only in a binary built with it.
    fn check_listen(&self, shards: usize) -> Result<(), Invalid> {
        if self.listen.client.is_empty() {
            return Err(err("listen.client", "names no listener".into()));
        }
        for (key, endpoint) in std::iter::once(("listen.peer", &self.listen.peer))
            .chain(self.listen.client.iter().map(|e| ("listen.client", e)))
        {
            if endpoint.addr.port() == 0 {
                return Err(err(key, format!("`{endpoint}` needs a port other than 0")));
            }
            if endpoint.for_shard(shards as u32 - 1).is_none() {
                return Err(err(
                    key,
                    format!("`{endpoint}`: port plus {shards} shards passes 65535"),
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
        Ok(())
    }

    /// `[cluster]`, when given: distinct non-zero ids, shards on every member, and this node
    /// listed as it is configured here.
    fn check_cluster(&self, shards: usize) -> Result<(), Invalid> {
        if self.cluster.nodes.is_empty() {
            return Ok(());
        }
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
            None => Err(err(
                "cluster.nodes",
                format!("does not list this node (node.id = {})", self.node.id),
            )),
            Some(me) if me.shards as usize != shards => Err(err(
                "cluster.nodes",
                format!(
                    "lists this node with {} shards but node.cores has {}",
                    me.shards, shards
                ),
            )),
            Some(me) if me.peer != self.listen.peer => Err(err(
                "cluster.nodes",
                format!(
                    "lists this node's peer address as {} but listen.peer is {}",
                    me.peer, self.listen.peer
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    /// `[storage]`: the page size, and the sizes and counts that must fit it.
    fn check_storage(&self) -> Result<(), Invalid> {
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
        Ok(())
    }

    /// `storage.wal_size_per_shard`: at least 16 pages, and room for the largest request a
    /// volume sends (1 MiB of data and its headers) beside the room raft's own records keep
    /// (docs/architecture.md, "WAL space"). Runs after `check_storage`.
    fn check_wal_room(&self) -> Result<(), Invalid> {
        let page = self.storage.page_size.bytes();
        if self.storage.wal_size_per_shard.bytes() < 16 * page {
            return Err(err(
                "storage.wal_size_per_shard",
                format!(
                    "{} is smaller than 16 pages",
                    self.storage.wal_size_per_shard
                ),
            ));
        }
        if self.storage.wal_size_per_shard.bytes() > WAL_SIZE_MAX {
            return Err(err(
                "storage.wal_size_per_shard",
                format!(
                    "{} is larger than {}",
                    self.storage.wal_size_per_shard,
                    ByteSize(WAL_SIZE_MAX)
                ),
            ));
        }
        let budget = WalBudget::for_ring(self.storage.wal_size_per_shard.bytes(), page);
        let piece = (1 << 20) + 1024;
        if budget.largest_admissible() < piece {
            let mut enough = self.storage.wal_size_per_shard.bytes();
            while WalBudget::for_ring(enough, page).largest_admissible() < piece {
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
        Ok(())
    }

    /// `[[devices]]`: at least one, each with the fields its backend takes and a size that
    /// holds the format. Runs after the storage checks.
    fn check_devices(&self, shards: usize) -> Result<(), Invalid> {
        if self.devices.is_empty() {
            return Err(err(
                "devices",
                "names no device; add a [[devices]] table".into(),
            ));
        }
        // Saturating: sizes near the top of u64 are refused by the size check, not overflowed.
        let minimum = self
            .storage
            .page_size
            .bytes()
            .saturating_add((shards as u64).saturating_mul(self.storage.wal_size_per_shard.bytes()))
            .saturating_add(self.storage.chunk_size.bytes());
        for (i, device) in self.devices.iter().enumerate() {
            self.check_backend_fields(i, device)?;
            self.check_device_size(i, device, minimum, shards)?;
        }
        Ok(())
    }

    /// The `i`th device's fields against its backend: each backend takes its own.
    fn check_backend_fields(&self, i: usize, device: &DeviceSection) -> Result<(), Invalid> {
        let key = |field: &str| device_key(i, field);
        match device.backend {
            Backend::Uring | Backend::Mem if device.create.is_some() || device.pcie.is_some() => {
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
            Backend::Spdk => self.check_spdk_device(i, device)?,
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
        Ok(())
    }

    /// The `i`th device, an `spdk` one: a bdev name, a binary built with SPDK, and its bdev
    /// made either by `create` or by `spdk.config_file`.
    fn check_spdk_device(&self, i: usize, device: &DeviceSection) -> Result<(), Invalid> {
        let key = |field: &str| device_key(i, field);
        let Some(bdev) = &device.bdev else {
            return Err(err(
                &key("bdev"),
                "the spdk backend needs a bdev name".into(),
            ));
        };
        if !cfg!(feature = "spdk") {
            return Err(err(
                &key("backend"),
                "spdk needs the spdk feature, which this binary was built without".into(),
            ));
        }
        match (device.create, &self.spdk.config_file) {
            (None, None) => Err(err(
                &key("create"),
                "say how the bdev is made (malloc, aio, nvme), or name \
                 an SPDK JSON config in spdk.config_file"
                    .into(),
            )),
            (Some(_), Some(_)) => Err(err(
                &key("create"),
                "spdk.config_file defines the bdevs; drop `create`".into(),
            )),
            (Some(SpdkCreate::Malloc), None) if device.size.is_none() => {
                Err(err(&key("size"), "a malloc bdev needs a size".into()))
            }
            (Some(SpdkCreate::Aio), None) if device.path.is_none() => {
                Err(err(&key("path"), "an aio bdev needs a path".into()))
            }
            (Some(SpdkCreate::Nvme), None) => self.check_nvme_device(i, device, bdev),
            _ => Ok(()),
        }
    }

    /// The `i`th device, an `spdk` one with `create = "nvme"`: a PCIe address, a bdev named
    /// for the controller's namespace 1, and PCI access.
    fn check_nvme_device(
        &self,
        i: usize,
        device: &DeviceSection,
        bdev: &str,
    ) -> Result<(), Invalid> {
        let key = |field: &str| device_key(i, field);
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
        Ok(())
    }

    /// The `i`th device's `size`, when given: a multiple of the page size, and at least
    /// `minimum`, room for a superblock, a WAL ring per shard and one chunk.
    fn check_device_size(
        &self,
        i: usize,
        device: &DeviceSection,
        minimum: u64,
        shards: usize,
    ) -> Result<(), Invalid> {
        let Some(size) = device.size else {
            return Ok(());
        };
        let key = |field: &str| device_key(i, field);
        if size.bytes() % self.storage.page_size.bytes() != 0 {
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
                    size, shards, self.storage.wal_size_per_shard, self.storage.chunk_size
                ),
            ));
        }
        Ok(())
    }

    /// `[raft]`: a tick, every timing a multiple of it, heartbeats well inside the election
    /// timeout and the lease ending before a new leader can be elected.
    fn check_raft(&self) -> Result<(), Invalid> {
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
        Ok(())
    }

    /// `[log]`: a known level and format.
    fn check_log(&self) -> Result<(), Invalid> {
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
        Ok(())
    }
}

/// Writes a set of cores in the cpulist syntax (`0-3,8`), for messages.
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
