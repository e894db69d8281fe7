//! The storage engine: everything between a raft entry and the bytes on the device.
//!
//! - [`dma`]: aligned buffers taken by ownership, convertible to and from `bytes::Bytes`.
//! - [`bdev`]: the block-device trait and its backends, chosen by URI.
//! - [`layout`]: where everything lives on the device, and the superblock (pure).
//! - [`table`]: the chunk table and chunk pool (pure).
//! - [`wal`]: the shard WAL with group commit, its record codec and replay.
//! - [`bdev::fault`]: a fault-injecting device for crash-consistency tests.
//! - [`bdev::inject`]: disk faults armed at run time in a running process (the fault suite).
//! - [`engine`]: one shard's engine: format, open and recover, chunk operations, checkpoint.

pub mod bdev;
pub mod dma;
pub mod engine;
pub mod layout;
pub mod table;
pub mod wal;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
pub(crate) mod test_device;

use bdev::BdevError;
use table::{ChunkId, TableError};

/// What the engine can fail with. Requests that are refused change nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The device failed.
    #[error(transparent)]
    Bdev(#[from] BdevError),
    /// The layout parameters cannot work.
    #[error("storage geometry: {0}")]
    Geometry(String),
    /// The device's superblock is missing, damaged or of another version.
    #[error("refusing the device: {0}")]
    BadSuperblock(String),
    /// A metadata page could not be trusted in either of its copies.
    #[error("corrupt {what} at byte {offset}: {reason}")]
    CorruptMetadata {
        /// Which structure.
        what: &'static str,
        /// Where on the device.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// The chunk table refused.
    #[error(transparent)]
    Table(#[from] TableError),
    /// A chunk request's offset or length is not page-aligned.
    #[error("chunk request of {len} bytes at {offset} is not aligned to the page size {page}")]
    Unaligned {
        /// Offset in the chunk.
        offset: u64,
        /// Length.
        len: u64,
        /// The page size.
        page: u32,
    },
    /// A chunk request reaches past the chunk's end.
    #[error("chunk request of {len} bytes at {offset} reaches past the chunk size {chunk_size}")]
    OutOfRange {
        /// Offset in the chunk.
        offset: u64,
        /// Length.
        len: u64,
        /// The chunk size.
        chunk_size: u64,
    },
    /// The chunk does not exist.
    #[error("chunk {0} does not exist")]
    ChunkNotFound(ChunkId),
    /// The chunk's snapshot does not exist.
    #[error("chunk {chunk} has no snapshot with sn {sn}")]
    SnapshotNotFound {
        /// The chunk.
        chunk: ChunkId,
        /// The sn asked for.
        sn: u64,
    },
    /// A write carries an sn older than the chunk's (Curve's BackwardRequest).
    #[error("chunk {chunk}: request sn {sn} is older than the chunk's sn {chunk_sn}")]
    BackwardRequest {
        /// The chunk.
        chunk: ChunkId,
        /// The request's sn.
        sn: u64,
        /// The chunk's sn.
        chunk_sn: u64,
    },
    /// A request conflicts with the chunk's state (for example a clone of an existing chunk).
    #[error("chunk {chunk}: {reason}")]
    Conflict {
        /// The chunk.
        chunk: ChunkId,
        /// What conflicts.
        reason: String,
    },
    /// The copyset is not on this shard and no room is left for another.
    #[error("copyset {0}: {1}")]
    Copyset(u64, String),
    /// The WAL has no room until the copysets apply and a checkpoint reclaims space.
    #[error("the WAL is full ({used} of {size} bytes in use); apply and checkpoint to reclaim")]
    WalFull {
        /// Bytes between head and tail.
        used: u64,
        /// The ring's size.
        size: u64,
    },
    /// A WAL record is larger than one batch may be.
    #[error("a WAL record of {len} bytes exceeds the batch limit of {limit}")]
    RecordTooLarge {
        /// The record's size.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The WAL stopped after a device error; the shard must restart and recover.
    #[error("the WAL failed and accepts nothing more: {0}")]
    WalFailed(String),
    /// A buffer could not be had.
    #[error(transparent)]
    Dma(#[from] dma::DmaError),
}

impl StorageError {
    /// Whether the device failed (or its contents cannot be trusted): what a shard cannot go
    /// on from, unlike a refusal or a full WAL.
    pub fn is_device_failure(&self) -> bool {
        matches!(
            self,
            StorageError::Bdev(_)
                | StorageError::WalFailed(_)
                | StorageError::CorruptMetadata { .. }
        )
    }
}
