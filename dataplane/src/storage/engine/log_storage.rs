//! Raft's read view of one copyset's log in the shard WAL.

use raftcore::{
    ConfState, Entry, HardState, LogIndex, LogStorage, SnapshotMeta, SnapshotPiece,
    StorageError as RaftStorageError, Term,
};

use crate::storage::bdev::Bdev;
use crate::storage::wal::log::CopysetLog;
use crate::storage::wal::record::CopysetId;
use crate::storage::wal::ShardWal;

/// Raft's read view of one copyset's log in the shard WAL.
#[derive(Debug)]
pub struct CopysetStorage<B: Bdev> {
    pub(super) wal: ShardWal<B>,
    pub(super) copyset: CopysetId,
}

impl<B: Bdev> CopysetStorage<B> {
    fn with<R>(&self, f: impl FnOnce(&CopysetLog) -> R) -> R {
        self.wal.with_log_or_empty(self.copyset, f)
    }
}

impl<B: Bdev> LogStorage for CopysetStorage<B> {
    fn initial_state(&self) -> Result<(HardState, ConfState), RaftStorageError> {
        self.with(|log| log.initial_state())
    }
    fn entries(
        &self,
        low: LogIndex,
        high: LogIndex,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        self.with(|log| log.entries(low, high, max_bytes))
    }
    fn term(&self, index: LogIndex) -> Result<Term, RaftStorageError> {
        self.with(|log| log.term(index))
    }
    fn first_index(&self) -> Result<LogIndex, RaftStorageError> {
        self.with(|log| log.first_index())
    }
    fn last_index(&self) -> Result<LogIndex, RaftStorageError> {
        self.with(|log| log.last_index())
    }
    fn snapshot_meta(&self) -> Result<SnapshotMeta, RaftStorageError> {
        self.with(|log| log.snapshot_meta())
    }
    fn snapshot_piece(
        &self,
        index: LogIndex,
        offset: u64,
        max_bytes: u64,
    ) -> Result<SnapshotPiece, RaftStorageError> {
        self.with(|log| log.snapshot_piece(index, offset, max_bytes))
    }
}
