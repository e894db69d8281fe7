//! Where a request goes: the shard of a node that serves a copyset, and a node's client
//! address. Both ends apply the same rules, so a client, a forwarding shard and a sending
//! replica agree without asking.

use crate::config::Endpoint;
use crate::ids::CopysetId;

/// Where copysets live: the same rule on every node, so a sender knows the destination shard
/// from the copyset id and the destination's shard count alone.
pub fn shard_of(copyset: CopysetId, shard_count: u32) -> u32 {
    // splitmix64: a fixed, well-mixed hash (the standard library's hasher may change).
    let x = crate::rng::mix64(copyset.0.wrapping_add(0x9e37_79b9_7f4a_7c15));
    (x % u64::from(shard_count.max(1))) as u32
}

/// A chunkserver as the client sees it.
#[derive(Debug, Clone, Copy)]
pub struct NodeAddress {
    /// Its node id.
    pub id: u64,
    /// Its client listener (base port; shard i at port + i).
    pub endpoint: Endpoint,
    /// Its shard count.
    pub shards: u32,
}

impl NodeAddress {
    /// The cluster's nodes as a configuration lists them in `[cluster]` (each by its first
    /// client listener); a configuration without a `[cluster]` section names only itself.
    pub fn from_config(config: &crate::config::Config) -> Vec<NodeAddress> {
        let mut nodes: Vec<NodeAddress> = config
            .cluster
            .nodes
            .iter()
            .filter_map(|n| {
                Some(NodeAddress {
                    id: u64::from(n.id),
                    endpoint: *n.client.first()?,
                    shards: n.shards,
                })
            })
            .collect();
        if nodes.is_empty() {
            if let Some(endpoint) = config.listen.client.first() {
                nodes.push(NodeAddress {
                    id: u64::from(config.node.id),
                    endpoint: *endpoint,
                    shards: 1,
                });
            }
        }
        nodes
    }
}
