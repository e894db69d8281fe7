//! What the host offers (online cores, NUMA nodes), as far as validation needs to know.

use std::collections::BTreeSet;

use super::values::parse_cpulist;

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

    pub(super) fn numa_cores(&self, node: u32) -> Option<&BTreeSet<u32>> {
        self.numa_nodes
            .iter()
            .find(|(id, _)| *id == node)
            .map(|(_, cores)| cores)
    }
}
