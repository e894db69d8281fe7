//! The chunkserver proper: shards that serve copysets over the network.
//!
//! - `wire`: the chunk and copyset services on the frame protocol.
//! - `shard`: one shard's server — engine, copysets, listeners, peer connections.

pub mod local;
pub mod node;
pub mod shard;
pub mod wire;

pub use local::{free_ports, GeneratedCluster, LocalCluster};
pub use node::{run_node, NodeError};
pub use shard::{shard_of, ClusterView, RaftTimings, ShardServer};
