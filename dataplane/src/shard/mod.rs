//! Thread-per-core shards: one glommio executor per configured core, pinned, each the sole
//! owner of its copysets, WAL ring, buffer pool and listeners. Shards share nothing mutable;
//! the few cross-shard messages (forwarded requests, copyset creation) travel through a
//! bounded channel mesh, and a shutdown signal tells every shard to stop.

pub mod runtime;

pub use runtime::{start_shards, Mesh, ShardContext, ShardError, ShardId, ShutdownSignal};
