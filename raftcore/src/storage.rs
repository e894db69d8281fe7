//! What raft reads from persistent storage. The driver writes (appends entries, saves the hard
//! state, installs snapshots, compacts) through its own methods, as `ready()` tells it to; raft
//! only reads through this trait. The chunkserver backs it with its shard WAL; `MemStorage` is
//! the in-memory implementation for tests.

use crate::types::{ConfState, Entry, HardState, LogIndex, SnapshotMeta, Term};

/// Why a storage read did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// The index is below the compaction point: the entries are only in a snapshot.
    Compacted,
    /// The index is past the last entry.
    Unavailable,
    /// The entries exist but are not in memory yet (an async log); raft retries when the
    /// driver reports them fetched.
    TemporarilyUnavailable,
    /// The device failed or the record was corrupt; raft cannot go on with this group.
    Io(String),
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageError::Compacted => f.write_str("log compacted"),
            StorageError::Unavailable => f.write_str("log index unavailable"),
            StorageError::TemporarilyUnavailable => f.write_str("log entries not yet fetched"),
            StorageError::Io(reason) => write!(f, "log storage error: {reason}"),
        }
    }
}

impl std::error::Error for StorageError {}

/// The persisted raft state of one group, as raft reads it.
///
/// Invariant: `first_index() <= last_index() + 1`, and `term(first_index() - 1)` answers with
/// the snapshot's term.
pub trait LogStorage {
    /// The hard state and membership persisted at start-up.
    fn initial_state(&self) -> Result<(HardState, ConfState), StorageError>;
    /// Entries in `[low, high)`, at most `max_bytes` of payload but always at least one.
    fn entries(
        &self,
        low: LogIndex,
        high: LogIndex,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, StorageError>;
    /// The term of the entry at `index`; also answers for the snapshot's last index.
    fn term(&self, index: LogIndex) -> Result<Term, StorageError>;
    /// The first index still in the log (snapshot index + 1).
    fn first_index(&self) -> Result<LogIndex, StorageError>;
    /// The last index in the log (the snapshot index when the log is empty).
    fn last_index(&self) -> Result<LogIndex, StorageError>;
    /// Metadata of the latest snapshot (index 0 when there is none).
    fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError>;
}
