//! What raft reads from persistent storage. The driver writes (appends entries, saves the hard
//! state, installs snapshots, compacts) through its own methods, as `ready()` tells it to; raft
//! only reads through this trait. The chunkserver backs it with its shard WAL; `MemStorage` is
//! the in-memory implementation for tests.

use bytes::Bytes;

use crate::types::{ConfState, Entry, HardState, LogIndex, Snapshot, SnapshotMeta, Term};

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
    /// Up to `max_bytes` of the snapshot at `index`, from byte `offset`, with the snapshot's
    /// metadata and total length. The leader sends a snapshot in such pieces and sticks to the
    /// snapshot it started with, so storage should keep serving a snapshot for a while after a
    /// newer one replaced it (a transfer would otherwise restart at every compaction). When it
    /// no longer has the snapshot at `index`, answer `Unavailable`: the leader starts over with
    /// the latest one.
    fn snapshot_piece(
        &self,
        index: LogIndex,
        offset: u64,
        max_bytes: u64,
    ) -> Result<SnapshotPiece, StorageError>;
}

/// A slice of a snapshot's data, as storage hands it to the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPiece {
    /// What the whole snapshot covers.
    pub meta: SnapshotMeta,
    /// The bytes from the requested offset.
    pub data: Bytes,
    /// Length of the whole snapshot's data.
    pub total_len: u64,
}

/// How many replaced snapshots `MemStorage` keeps serving to transfers under way.
const RETAINED_SNAPSHOTS: usize = 3;

/// An in-memory `LogStorage` for tests and the simulator. The driver writes through its own
/// methods (`append`, `set_hard_state`, `apply_snapshot`, `create_snapshot`) as
/// `Ready` tells it to; everything it holds counts as persisted.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    hard_state: HardState,
    /// The latest snapshot; `snapshot.meta.index` is the compaction point.
    snapshot: Snapshot,
    /// A few replaced snapshots, still served to transfers that started with them.
    /// Invariant: at most `RETAINED_SNAPSHOTS`, oldest first.
    retained: Vec<Snapshot>,
    /// Invariant: `entries[i].index == snapshot.meta.index + 1 + i`.
    entries: Vec<Entry>,
}

impl MemStorage {
    /// An empty log with no membership: a peer that waits to be added by a leader.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// A log bootstrapped with `conf_state` as a snapshot at index 1, term 1: how a new group
    /// starts. Every initial member starts from the same bootstrap; peers added later receive
    /// it from the leader as a snapshot.
    pub fn new_with_conf_state(conf_state: ConfState) -> MemStorage {
        let meta = SnapshotMeta {
            index: LogIndex(1),
            term: Term(1),
            conf_state,
        };
        MemStorage {
            hard_state: HardState {
                term: Term(1),
                vote: None,
                commit: LogIndex(1),
            },
            snapshot: Snapshot {
                meta,
                data: Bytes::new(),
            },
            retained: Vec::new(),
            entries: Vec::new(),
        }
    }

    /// Persists the hard state.
    pub fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }

    /// The persisted hard state.
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// Appends entries, first dropping every persisted entry at or after the first new index
    /// (a follower's log may be overwritten by the leader's). Entries below the compaction
    /// point are skipped: they are already in the snapshot.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first_new) = entries.first() else {
            return;
        };
        let snapshot_index = self.snapshot.meta.index.0;
        let skip = (snapshot_index + 1).saturating_sub(first_new.index.0) as usize;
        let Some(first_kept) = entries.get(skip) else {
            return;
        };
        let keep = (first_kept.index.0 - snapshot_index - 1) as usize;
        assert!(keep <= self.entries.len(), "append leaves a gap in the log");
        self.entries.truncate(keep);
        self.entries.extend_from_slice(&entries[skip..]);
    }

    /// Installs a snapshot received from the leader: the log is replaced by it.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) {
        if snapshot.meta.index <= self.snapshot.meta.index {
            return;
        }
        self.hard_state.commit = self.hard_state.commit.max(snapshot.meta.index);
        if self.hard_state.term < snapshot.meta.term {
            self.hard_state.term = snapshot.meta.term;
        }
        self.entries.clear();
        self.snapshot = snapshot;
    }

    /// Records a snapshot the state machine made at `index` (which must be applied, hence in
    /// the log) and compacts the log up to it: entries through `index` are dropped and later
    /// reads of them answer `Compacted`.
    pub fn create_snapshot(
        &mut self,
        index: LogIndex,
        conf_state: ConfState,
        data: Bytes,
    ) -> Result<(), StorageError> {
        if index <= self.snapshot.meta.index {
            return Ok(());
        }
        let term = self.term(index)?;
        let drop = (index.0 - self.snapshot.meta.index.0) as usize;
        self.entries.drain(..drop.min(self.entries.len()));
        let meta = SnapshotMeta {
            index,
            term,
            conf_state,
        };
        let replaced = std::mem::replace(&mut self.snapshot, Snapshot { meta, data });
        self.retained.push(replaced);
        if self.retained.len() > RETAINED_SNAPSHOTS {
            self.retained.remove(0);
        }
        Ok(())
    }

    fn last_index_raw(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot.meta.index.0, |e| e.index.0)
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

impl LogStorage for MemStorage {
    fn initial_state(&self) -> Result<(HardState, ConfState), StorageError> {
        Ok((self.hard_state, self.snapshot.meta.conf_state.clone()))
    }

    fn entries(
        &self,
        low: LogIndex,
        high: LogIndex,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let snapshot_index = self.snapshot.meta.index.0;
        if low.0 <= snapshot_index {
            return Err(StorageError::Compacted);
        }
        if high.0 > self.last_index_raw() + 1 || low > high {
            return Err(StorageError::Unavailable);
        }
        let from = (low.0 - snapshot_index - 1) as usize;
        let to = (high.0 - snapshot_index - 1) as usize;
        let mut out = Vec::with_capacity(to - from);
        let mut bytes = 0u64;
        for entry in &self.entries[from..to] {
            bytes += entry.data.len() as u64;
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        let snapshot_index = self.snapshot.meta.index.0;
        if index.0 == snapshot_index {
            return Ok(self.snapshot.meta.term);
        }
        if index.0 < snapshot_index {
            return Err(StorageError::Compacted);
        }
        self.entries
            .get((index.0 - snapshot_index - 1) as usize)
            .map(|e| e.term)
            .ok_or(StorageError::Unavailable)
    }

    fn first_index(&self) -> Result<LogIndex, StorageError> {
        Ok(LogIndex(self.snapshot.meta.index.0 + 1))
    }

    fn last_index(&self) -> Result<LogIndex, StorageError> {
        Ok(LogIndex(self.last_index_raw()))
    }

    fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError> {
        Ok(self.snapshot.meta.clone())
    }

    fn snapshot_piece(
        &self,
        index: LogIndex,
        offset: u64,
        max_bytes: u64,
    ) -> Result<SnapshotPiece, StorageError> {
        let snapshot = std::iter::once(&self.snapshot)
            .chain(self.retained.iter().rev())
            .find(|s| s.meta.index == index)
            .ok_or(StorageError::Unavailable)?;
        let total_len = snapshot.data.len() as u64;
        let from = offset.min(total_len) as usize;
        let to = offset.saturating_add(max_bytes.max(1)).min(total_len) as usize;
        Ok(SnapshotPiece {
            meta: snapshot.meta.clone(),
            data: snapshot.data.slice(from..to),
            total_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::EntryKind;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            term: Term(term),
            index: LogIndex(index),
            kind: EntryKind::Normal,
            data: Bytes::from(vec![index as u8; 10]),
        }
    }

    #[test]
    fn append_overwrites_conflicting_suffix_and_compaction_answers_compacted() {
        let mut store = MemStorage::new();
        store.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]);
        store.append(&[entry(2, 2)]);
        assert_eq!(store.last_index(), Ok(LogIndex(2)));
        assert_eq!(store.term(LogIndex(2)), Ok(Term(2)));
        store
            .create_snapshot(LogIndex(1), ConfState::default(), Bytes::from_static(b"s"))
            .unwrap();
        assert_eq!(store.term(LogIndex(0)), Err(StorageError::Compacted));
        assert_eq!(store.term(LogIndex(1)), Ok(Term(1)));
        assert_eq!(
            store.entries(LogIndex(1), LogIndex(3), u64::MAX),
            Err(StorageError::Compacted)
        );
        assert_eq!(
            store
                .entries(LogIndex(2), LogIndex(3), u64::MAX)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(store.first_index(), Ok(LogIndex(2)));
    }

    #[test]
    fn entries_respect_the_byte_limit_but_return_at_least_one() {
        let mut store = MemStorage::new();
        store.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]);
        assert_eq!(store.entries(LogIndex(1), LogIndex(4), 0).unwrap().len(), 1);
        assert_eq!(
            store.entries(LogIndex(1), LogIndex(4), 20).unwrap().len(),
            2
        );
        assert_eq!(
            store.entries(LogIndex(1), LogIndex(5), 20),
            Err(StorageError::Unavailable)
        );
    }

    #[test]
    fn snapshot_pieces_cover_the_data_and_refuse_a_replaced_snapshot() {
        let mut store = MemStorage::new();
        store.append(&[entry(1, 1), entry(2, 1)]);
        store
            .create_snapshot(
                LogIndex(2),
                ConfState::default(),
                Bytes::from_static(b"abcdef"),
            )
            .unwrap();
        let piece = store.snapshot_piece(LogIndex(2), 4, 4).unwrap();
        assert_eq!((&piece.data[..], piece.total_len), (&b"ef"[..], 6));
        assert_eq!(
            piece.meta.index,
            LogIndex(2),
            "replaced snapshots are still served"
        );
        assert_eq!(
            store.snapshot_piece(LogIndex(7), 0, 4),
            Err(StorageError::Unavailable)
        );
    }
}
