//! The chunkserver proper: shards that serve copysets over the network.
//!
//! The wire format they speak lives in [`crate::protocol`].
//!
//! - `shard`: one shard's server — engine, copysets, listeners, peer connections.

mod heartbeat;
pub mod local;
pub mod node;
pub mod shard;

pub use local::{free_ports, GeneratedCluster, LocalCluster};

/// The exit status of a process that stopped because its device failed.
pub const EXIT_DEVICE_FAILED: i32 = 3;

/// Ends the process after a device failure that a copyset cannot go on from (a WAL write or
/// sync, an apply, a checkpoint). Fail-stop: a process that stays up with a failed device
/// would keep its leaderships and stall every copyset it leads, while a process that ends
/// lets the others elect new leaders at once, and its restart recovers from the WAL —
/// everything it acknowledged was synced before the acknowledgement.
pub(crate) fn fail_stop(
    node: u64,
    shard: u32,
    what: &str,
    error: &crate::storage::StorageError,
) -> ! {
    tracing::error!(node, shard, %error, "{what}: the device failed; the process stops (exit status {EXIT_DEVICE_FAILED}) so that a restart recovers from the WAL");
    std::process::exit(EXIT_DEVICE_FAILED)
}
pub use node::{run_node, NodeError};
pub use shard::{ClusterView, RaftTimings, ShardServer};
