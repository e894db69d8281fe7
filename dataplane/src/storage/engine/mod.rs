//! One shard's storage engine: the chunk store and the shard WAL on one region of a device,
//! and the checkpoint that ties them together.
//!
//! Durability rests on the WAL. A chunk write is applied without a flush; the copyset's
//! applied index is only remembered in memory. A checkpoint flushes the device, writes the
//! changed chunk-metadata pages and every copyset's state (hard state, membership, applied
//! index) into the alternate copies of their pages, flushes, and finally writes the anchor
//! with the new generation and WAL head, and flushes. Recovery believes pages no newer than
//! the anchor, then replays the WAL from the head; the chunkserver re-applies committed
//! entries above each copyset's checkpointed applied index, which is idempotent.
//!
//! Free slots read as zeroes. A slot is zeroed before it returns to the pool. After a crash,
//! the slots that may have been written since the last checkpoint without their metadata
//! reaching the device are the lowest free ones (the pool always hands out the lowest free
//! slot, and a checkpoint is forced after [`RECOVERY_ZERO_SLOTS`] allocations); recovery marks
//! those, and the slots that were being released, as possibly dirty, and a possibly dirty slot
//! is zeroed when it is next taken. The anchor lists the possibly dirty slots and says whether
//! the pool was untouched since it was written (format, or a clean close), so a fresh or
//! cleanly closed device has none.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use raftcore::{ConfState, Entry, HardState, LogIndex};

use crate::storage::bdev::Bdev;
use crate::storage::layout::{ShardLayout, Superblock};
use crate::storage::table::{ChunkId, ChunkTable};
use crate::storage::wal::record::CopysetId;
use crate::storage::wal::ShardWal;
use crate::storage::StorageError;

/// Allocations allowed between checkpoints; recovery zeroes this many of the lowest free
/// slots. Part of the format: changing it changes what recovery must zero.
pub const RECOVERY_ZERO_SLOTS: u32 = 32;

/// How to lay out a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatOptions {
    /// Page size.
    pub page_size: u32,
    /// Chunk (slot) size.
    pub chunk_size: u64,
    /// WAL ring size per shard.
    pub wal_size: u64,
    /// Shards on the device.
    pub shard_count: u32,
    /// Copysets per shard.
    pub max_copysets: u32,
    /// The device reads as zeroes already (a file just created and filled): format then
    /// writes only the metadata, not the WAL rings and slots.
    pub device_is_zeroed: bool,
}

/// How a shard runs its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Largest WAL batch (one write and one flush).
    pub wal_max_batch: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            wal_max_batch: crate::storage::wal::DEFAULT_MAX_BATCH,
        }
    }
}

/// What a chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Its size (every chunk has the slot size).
    pub size: u64,
    /// Its sequence number.
    pub sn: u64,
    /// Its snapshot's sequence number, if it has one.
    pub snapshot_sn: Option<u64>,
    /// Curve's corrected sn.
    pub corrected_sn: u64,
    /// For a lazy clone, the chunk its unwritten pages read from.
    pub clone_source: Option<ChunkId>,
}

/// A copyset as recovery found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredCopyset {
    /// Which.
    pub copyset: CopysetId,
    /// Its persisted hard state.
    pub hard_state: HardState,
    /// Its persisted membership.
    pub conf_state: ConfState,
    /// The applied index the last checkpoint made durable.
    pub applied: LogIndex,
    /// Committed entries above `applied`, to apply again (idempotently) in order.
    pub to_apply: Vec<Entry>,
}

/// What recovery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The checkpoint generation recovery started from.
    pub generation: u64,
    /// Chunks in the table.
    pub chunks: usize,
    /// WAL records replayed.
    pub wal_records: usize,
    /// Why the WAL scan stopped.
    pub wal_stop: String,
    /// WAL records that did not follow their copyset's log and were skipped (none, unless
    /// something is wrong: recovery logs each).
    pub wal_skipped: usize,
    /// Free slots that may hold bytes from before a crash (zeroed when next taken).
    pub possibly_dirty_slots: usize,
    /// The copysets, in id order.
    pub copysets: Vec<RecoveredCopyset>,
}

/// The storage engine of one shard.
#[derive(Debug)]
pub struct ShardEngine<B: Bdev> {
    bdev: Rc<B>,
    layout: ShardLayout,
    superblock: Superblock,
    table: RefCell<ChunkTable>,
    wal: ShardWal<B>,
    checkpoint: RefCell<CheckpointState>,
    checkpoint_turn: Turnstile,
    /// Snapshot page preservations marked so far, and how many of them the last checkpoint
    /// to complete made durable: concurrent first writes after a snapshot share checkpoints
    /// (`checkpoint_covering`).
    preserved: Cell<(u64, u64)>,
    /// Page bitmaps of the slots that have one in use (snapshots), with the copy on the
    /// device that holds the current version.
    bitmaps: RefCell<BTreeMap<u32, (Vec<u64>, u8)>>,
    /// Bitmap pages changed since the last checkpoint.
    dirty_bitmaps: RefCell<BTreeSet<u32>>,
    /// Lazy clone chunks (by slot) and the chunk their unwritten pages read from. A clone's
    /// bitmap (in `bitmaps`) marks the pages written since it was created.
    clone_sources: RefCell<BTreeMap<u32, ChunkId>>,
    /// Per slot, the bitmap copy that holds its latest written version. Kept when a snapshot
    /// or clone goes away: until a checkpoint commits that, the committed metadata may still
    /// need that copy, so a new bitmap in the same slot must go to the other one.
    bitmap_copies: RefCell<BTreeMap<u32, u8>>,
    /// Counts changes of which chunks are lazy clones of which (a clone made, flattened or
    /// deleted): a copyset image copied while it changed must start over, since whether a
    /// write to a source is refused depends on them.
    clone_epoch: Cell<u64>,
    /// The next staged image's id (see `engine::image::STAGING_BASE`).
    staging: Cell<u64>,
    /// Chunks an install's swap retired (renamed to staging ids) that no checkpoint has
    /// recorded as retired yet: until one does, the committed table still names their slots
    /// as the chunks they replaced, so their bytes must stay (see `engine::image`).
    retired: RefCell<Vec<ChunkId>>,
    /// Retired chunks whose retirement a checkpoint committed: free to delete.
    retired_durable: RefCell<Vec<ChunkId>>,
}

impl<B: Bdev> ShardEngine<B> {
    /// The shard's WAL: append entries and hard state, then `sync`.
    pub fn wal(&self) -> &ShardWal<B> {
        &self.wal
    }

    /// The device.
    pub fn bdev(&self) -> &Rc<B> {
        &self.bdev
    }

    /// Where this shard's structures are.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// The device's superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// Bytes the in-memory chunk table holds, and its slot count.
    pub fn table_memory(&self) -> (usize, u32) {
        let table = self.table.borrow();
        (table.memory_bytes(), table.slot_count())
    }

    /// Whether the shard holds `chunk`.
    pub fn has_chunk(&self, chunk: ChunkId) -> bool {
        self.table.borrow().lookup(chunk).is_some()
    }

    /// Chunk slots: (all, free).
    pub fn slot_counts(&self) -> (u32, u32) {
        let table = self.table.borrow();
        (table.slot_count(), table.free_count())
    }

    /// Raft's read view of one copyset's log.
    pub fn log_storage(&self, copyset: CopysetId) -> CopysetStorage<B> {
        CopysetStorage {
            wal: self.wal.clone(),
            copyset,
        }
    }

    /// Records that the state machine of `copyset` has applied everything up to `index`.
    /// Call it only once every write of those entries has completed.
    pub fn set_applied(&self, copyset: CopysetId, index: LogIndex) {
        self.wal.with_log_mut(copyset, |log| {
            let index = log.applied_cap.map_or(index, |cap| index.min(cap));
            if index > log.applied {
                log.applied = index;
            }
        });
    }

    /// Keeps the applied index of `copyset` below `index` until [`release_applied`]: the
    /// entry at `index` changed the membership, and the WAL could not take the new membership
    /// yet. A checkpoint meanwhile records the old membership with an applied index below the
    /// change, so a restart applies the change again instead of losing it (issue 25, item 4).
    ///
    /// [`release_applied`]: Self::release_applied
    pub fn hold_applied_below(&self, copyset: CopysetId, index: LogIndex) {
        self.wal.with_log_mut(copyset, |log| {
            log.applied_cap = Some(LogIndex(index.0.saturating_sub(1)).max(log.applied));
        });
    }

    /// Ends a [`hold_applied_below`](Self::hold_applied_below).
    pub fn release_applied(&self, copyset: CopysetId) {
        self.wal.with_log_mut(copyset, |log| log.applied_cap = None);
    }

    /// Checks an operation's geometry (page alignment, inside the chunk) before it is
    /// proposed, as its apply would; the apply checks again.
    pub fn check_op(&self, op: &crate::copyset::ChunkOp) -> Result<(), StorageError> {
        use crate::copyset::ChunkOp;
        let source = match op {
            ChunkOp::CreateClone { source, .. } => Some(*source),
            _ => None,
        };
        for chunk in std::iter::once(op.chunk()).chain(source) {
            if image::is_staging(chunk) {
                return Err(StorageError::Conflict {
                    chunk,
                    reason: "chunk ids from 0xFFFFFFF000000000 are reserved for snapshot \
                             installs"
                        .into(),
                });
            }
        }
        match op {
            ChunkOp::Write { offset, data, .. } | ChunkOp::Paste { offset, data, .. } => {
                self.check_request(u64::from(*offset), data.len() as u64)
            }
            ChunkOp::Recover { offset, len, .. } => {
                self.check_request(u64::from(*offset), u64::from(*len))
            }
            _ => Ok(()),
        }
    }

    fn check_request(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        let geometry = &self.layout.geometry;
        let page = u64::from(geometry.page_size);
        if len == 0 || offset % page != 0 || len % page != 0 {
            return Err(StorageError::Unaligned {
                offset,
                len,
                page: geometry.page_size,
            });
        }
        if offset
            .checked_add(len)
            .map_or(true, |end| end > geometry.chunk_size)
        {
            return Err(StorageError::OutOfRange {
                offset,
                len,
                chunk_size: geometry.chunk_size,
            });
        }
        Ok(())
    }
}

mod checkpoint;
mod chunks;
mod clone;
mod device;
mod image;
mod log_storage;
mod open;
mod snapshot;

use checkpoint::{CheckpointState, Turnstile};
pub use device::{format, read_superblock};
pub use image::{ChunkImageMeta, ImagePart, ImagePiece};
pub use log_storage::CopysetStorage;

#[cfg(test)]
mod tests;
