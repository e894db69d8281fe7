//! The chunkserver dataplane: configuration, and (as they land) shards, copysets, the storage
//! engine, the transports, the services, the client library and the NBD export.

#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

pub mod client;
pub mod config;
pub mod copyset;
pub mod demo;
#[cfg(test)]
mod fuzz_tests;
pub mod ids;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod nbd;
pub mod net;
pub mod placement;
pub mod protocol;
pub mod rng;
pub mod scrub;
pub mod server;
pub mod shard;
pub mod storage;
pub mod units;
pub mod volume;
pub mod volume_table;
