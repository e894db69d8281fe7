//! One copyset's raft log as the WAL holds it: the persisted hard state and membership, the
//! snapshot point, and the entries after it, kept in memory for raft's reads. Pure: both the
//! live WAL and recovery's replay drive it with the same records, so the two cannot disagree.

use std::collections::VecDeque;

use bytes::Bytes;
use raftcore::{
    ConfState, Entry, HardState, LogIndex, LogStorage, Snapshot, SnapshotMeta, SnapshotPiece,
    StorageError, Term,
};

use super::record::{RecordBody, HEADER_LEN};

/// An entry the log holds, with where its record is and what it costs in the ring.
#[derive(Debug, Clone)]
struct Stored {
    entry: Entry,
    /// Position of its record in the ring.
    lsn: u64,
    /// Bytes of its record.
    len: u64,
    /// A running total of record bytes, up to and including this entry (log-local: only
    /// differences between entries mean anything).
    end: u64,
}

/// Bytes of the WAL record that holds `entry`.
pub fn entry_record_len(entry: &Entry) -> u64 {
    (HEADER_LEN + entry.data.len()) as u64
}

/// A copyset's log.
#[derive(Debug, Clone, Default)]
pub struct CopysetLog {
    /// The latest persisted hard state.
    pub hard_state: HardState,
    /// The latest persisted membership.
    pub conf_state: ConfState,
    /// Everything up to `snapshot.index` is compacted.
    pub snapshot: SnapshotMeta,
    /// The state machine's image at `snapshot.index`, as it wrote it (empty after a
    /// compaction the engine made at a checkpoint: the chunks are then the image).
    pub snapshot_data: Bytes,
    /// Position of the WAL record that holds `snapshot_data`, while the WAL still has it.
    pub snapshot_lsn: Option<u64>,
    /// Entries after the snapshot, each with the position and size of its record.
    /// Invariant: indices are contiguous from `snapshot.index + 1`, and `end` grows by each
    /// entry's `len`.
    entries: VecDeque<Stored>,
    /// Highest index whose effects the state machine has applied (in memory).
    /// Invariant: `applied >= snapshot.index` once set by the engine.
    pub applied: LogIndex,
    /// Entry records before this ring position are not part of the log (see the copyset
    /// page's field of that name): replay skips them.
    pub replay_from: u64,
    /// The applied index may not pass this (a membership change at the next index is not in
    /// the WAL yet: a checkpoint must not record the new index with the old membership).
    pub applied_cap: Option<LogIndex>,
    /// Checkpoints keep the entries from this index on in memory (0: no pin): a leader sets
    /// it to what a follower catching up needs next, so a follower that just installed a
    /// snapshot finds the entries after it instead of being sent another snapshot.
    pub retain_from: LogIndex,
}

/// Why a record could not be taken into a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogGap {
    /// The index the record carried.
    pub index: LogIndex,
    /// The last index in the log.
    pub last: LogIndex,
}

impl CopysetLog {
    /// A log restored from a checkpoint.
    pub fn from_checkpoint(
        hard_state: HardState,
        conf_state: ConfState,
        snapshot: SnapshotMeta,
    ) -> CopysetLog {
        CopysetLog {
            hard_state,
            conf_state,
            applied: snapshot.index,
            snapshot,
            snapshot_data: Bytes::new(),
            snapshot_lsn: None,
            entries: VecDeque::new(),
            replay_from: 0,
            applied_cap: None,
            retain_from: LogIndex(0),
        }
    }

    /// The last index (the snapshot's when no entry follows it).
    pub fn last(&self) -> LogIndex {
        self.entries
            .back()
            .map_or(self.snapshot.index, |s| s.entry.index)
    }

    /// Takes one record (an entry at position `lsn`, or state) into the log. An entry at an
    /// index the log already has with another term replaces it and everything after it
    /// (raft's truncation); with the same term it is the same entry (log matching), whose
    /// record now also stands at `lsn`: the log keeps what follows it. That makes a record
    /// written again (a retried append, or the checkpoint moving live entries forward) safe
    /// to replay even when a crash tore the copies that follow. An entry at or below the
    /// snapshot is already covered and ignored.
    pub fn take(&mut self, body: &RecordBody, lsn: u64) -> Result<(), LogGap> {
        match body {
            RecordBody::Entry(entry) => {
                if entry.index <= self.snapshot.index || lsn < self.replay_from {
                    return Ok(());
                }
                let last = self.last();
                if entry.index.0 > last.0 + 1 {
                    return Err(LogGap {
                        index: entry.index,
                        last,
                    });
                }
                let at = (entry.index.0 - self.snapshot.index.0 - 1) as usize;
                if let Some(stored) = self.entries.get_mut(at) {
                    if stored.entry.term == entry.term {
                        stored.lsn = lsn;
                        return Ok(());
                    }
                }
                self.entries.truncate(at);
                let len = entry_record_len(entry);
                let end = self.entries.back().map_or(0, |s| s.end) + len;
                self.entries.push_back(Stored {
                    entry: entry.clone(),
                    lsn,
                    len,
                    end,
                });
            }
            RecordBody::HardState(hs) => self.hard_state = *hs,
            RecordBody::ConfState(cs) => self.conf_state = cs.clone(),
            RecordBody::Snapshot(snapshot) => {
                self.install_snapshot(snapshot.meta.clone());
                if self.snapshot == snapshot.meta {
                    self.snapshot_data = snapshot.data.clone();
                    self.snapshot_lsn = Some(lsn);
                }
            }
            // The WAL drops the whole log on this record; nothing to do in it.
            RecordBody::Pad(_) | RecordBody::Removed => {}
        }
        Ok(())
    }

    /// Installs a snapshot: entries it covers go; entries after it stay only if the log
    /// agrees with it at its index.
    pub fn install_snapshot(&mut self, meta: SnapshotMeta) {
        if meta.index <= self.snapshot.index {
            return;
        }
        self.snapshot_data = Bytes::new();
        self.snapshot_lsn = None;
        let agrees = self.term_of(meta.index) == Some(meta.term);
        if agrees {
            let drop = (meta.index.0 - self.snapshot.index.0) as usize;
            self.entries.drain(..drop.min(self.entries.len()));
        } else {
            self.entries.clear();
        }
        self.conf_state = meta.conf_state.clone();
        self.snapshot = meta;
        if self.applied < self.snapshot.index {
            self.applied = self.snapshot.index;
        }
        if self.hard_state.commit < self.snapshot.index {
            self.hard_state.commit = self.snapshot.index;
        }
    }

    /// Drops entries up to `index` (at most the applied index), keeping its term as the
    /// snapshot point.
    pub fn compact(&mut self, index: LogIndex) {
        let index = index.min(self.applied).min(self.last());
        if index <= self.snapshot.index {
            return;
        }
        let Some(term) = self.term_of(index) else {
            return;
        };
        let drop = (index.0 - self.snapshot.index.0) as usize;
        self.entries.drain(..drop.min(self.entries.len()));
        self.snapshot.index = index;
        self.snapshot.term = term;
        self.snapshot.conf_state = self.conf_state.clone();
        self.snapshot_data = Bytes::new();
        self.snapshot_lsn = None;
    }

    /// The snapshot a record would install when the state machine made one at `index`
    /// (which must be in the log or be the current snapshot).
    pub fn snapshot_at(
        &self,
        index: LogIndex,
        conf_state: ConfState,
        data: Bytes,
    ) -> Option<Snapshot> {
        Some(Snapshot {
            meta: SnapshotMeta {
                index,
                term: self.term_of(index)?,
                conf_state,
            },
            data,
        })
    }

    fn term_of(&self, index: LogIndex) -> Option<Term> {
        if index == self.snapshot.index {
            return Some(self.snapshot.term);
        }
        if index < self.snapshot.index {
            return None;
        }
        let at = (index.0 - self.snapshot.index.0 - 1) as usize;
        self.entries.get(at).map(|s| s.entry.term)
    }

    /// Position in `entries` of the first entry above `applied`.
    fn first_live(&self, applied: LogIndex) -> usize {
        applied.0.saturating_sub(self.snapshot.index.0) as usize
    }

    /// Position of the first record the log still needs after a checkpoint at `applied`:
    /// the lowest position of an entry above it (`None`: nothing above it). Entries whose
    /// records were written again sit after those that were not, so the lowest need not be
    /// the first.
    pub fn first_needed_lsn(&self, applied: LogIndex) -> Option<u64> {
        self.entries
            .range(self.first_live(applied).min(self.entries.len())..)
            .map(|s| s.lsn)
            .min()
    }

    /// The index a checkpoint compacts to when it keeps the applied entries whose records lie
    /// at or after `floor` (the ring's recent history), so that a replica that fell a little
    /// behind catches up from the log rather than by a copy of the chunks: the lowest index
    /// such that every applied entry after it has its record at or after `floor`. The
    /// applied index itself when none qualifies.
    pub fn retention_point(&self, floor: u64) -> LogIndex {
        let mut at = self.first_live(self.applied).min(self.entries.len());
        while at > 0 && self.entries[at - 1].lsn >= floor {
            at -= 1;
        }
        let point = LogIndex(self.snapshot.index.0 + at as u64);
        if self.retain_from.0 > 0 {
            point.min(LogIndex(self.retain_from.0 - 1))
        } else {
            point
        }
    }

    /// Bytes of ring that the records of the entries above the applied index take: what a
    /// checkpoint cannot reclaim, and what moving them forward costs.
    pub fn live_bytes(&self) -> u64 {
        let Some(back) = self.entries.back() else {
            return 0;
        };
        let at = self.first_live(self.applied);
        match self.entries.get(at) {
            Some(first) => back.end - (first.end - first.len),
            None => 0,
        }
    }

    /// The entries above the applied index, in order (cheap: payloads are shared).
    pub fn live_entries(&self) -> Vec<Entry> {
        let at = self.first_live(self.applied).min(self.entries.len());
        self.entries.range(at..).map(|s| s.entry.clone()).collect()
    }

    /// Entries in `[low, high)` without the size limit (for recovery's re-apply).
    pub fn entries_between(&self, low: LogIndex, high: LogIndex) -> Vec<Entry> {
        let first = self.snapshot.index.0 + 1;
        let low = low.0.max(first);
        let high = high.0.min(self.last().0 + 1);
        (low..high)
            .filter_map(|i| {
                self.entries
                    .get((i - first) as usize)
                    .map(|s| s.entry.clone())
            })
            .collect()
    }
}

impl LogStorage for CopysetLog {
    fn initial_state(&self) -> Result<(HardState, ConfState), StorageError> {
        Ok((self.hard_state, self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: LogIndex,
        high: LogIndex,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        if low <= self.snapshot.index {
            return Err(StorageError::Compacted);
        }
        if high.0 > self.last().0 + 1 || low > high {
            return Err(StorageError::Unavailable);
        }
        let first = self.snapshot.index.0 + 1;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for index in low.0..high.0 {
            let Some(Stored { entry, .. }) = self.entries.get((index - first) as usize) else {
                return Err(StorageError::Unavailable);
            };
            bytes += entry.data.len() as u64;
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        if index < self.snapshot.index {
            return Err(StorageError::Compacted);
        }
        self.term_of(index).ok_or(StorageError::Unavailable)
    }

    fn first_index(&self) -> Result<LogIndex, StorageError> {
        Ok(self.snapshot.index.next())
    }

    fn last_index(&self) -> Result<LogIndex, StorageError> {
        Ok(self.last())
    }

    fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError> {
        Ok(self.snapshot.clone())
    }

    fn snapshot_piece(
        &self,
        index: LogIndex,
        offset: u64,
        max_bytes: u64,
    ) -> Result<SnapshotPiece, StorageError> {
        if index != self.snapshot.index {
            return Err(StorageError::Unavailable);
        }
        let total_len = self.snapshot_data.len() as u64;
        let from = offset.min(total_len) as usize;
        let to = offset.saturating_add(max_bytes.max(1)).min(total_len) as usize;
        Ok(SnapshotPiece {
            meta: self.snapshot.clone(),
            data: self.snapshot_data.slice(from..to),
            total_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftcore::EntryKind;

    fn entry(index: u64, term: u64) -> RecordBody {
        RecordBody::Entry(Entry {
            term: Term(term),
            index: LogIndex(index),
            kind: EntryKind::Normal,
            data: vec![index as u8; 10].into(),
        })
    }

    #[test]
    fn a_catch_up_pin_keeps_the_entries_a_follower_needs_next() {
        let mut log = CopysetLog::default();
        for i in 1..=10 {
            log.take(&entry(i, 1), i * 100).unwrap();
        }
        log.applied = LogIndex(10);
        // Every record is older than the floor: all applied entries may go.
        assert_eq!(log.retention_point(10_000), LogIndex(10));
        // A follower installed a snapshot at 4 and needs 5 on: nothing from 5 goes.
        log.retain_from = LogIndex(5);
        assert_eq!(log.retention_point(10_000), LogIndex(4));
        log.compact(log.retention_point(10_000));
        assert_eq!(log.first_index(), Ok(LogIndex(5)));
        log.retain_from = LogIndex(0);
        assert_eq!(log.retention_point(10_000), LogIndex(10), "unpinned");
    }

    #[test]
    fn appends_truncate_conflicting_suffixes() {
        let mut log = CopysetLog::default();
        for i in 1..=5 {
            log.take(&entry(i, 1), i * 100).unwrap();
        }
        log.take(&entry(4, 2), 600).unwrap();
        assert_eq!(log.last(), LogIndex(4));
        assert_eq!(log.term(LogIndex(4)), Ok(Term(2)));
        assert_eq!(log.term(LogIndex(3)), Ok(Term(1)));
        assert_eq!(
            log.take(&entry(9, 2), 700),
            Err(LogGap {
                index: LogIndex(9),
                last: LogIndex(4)
            })
        );
    }

    #[test]
    fn the_log_answers_raft_as_log_storage_requires() {
        let mut log = CopysetLog::default();
        for i in 1..=10 {
            log.take(&entry(i, 1 + i / 5), i).unwrap();
        }
        log.applied = LogIndex(6);
        log.compact(LogIndex(8));
        assert_eq!(log.first_index(), Ok(LogIndex(7)));
        assert_eq!(log.last_index(), Ok(LogIndex(10)));
        assert_eq!(log.term(LogIndex(6)), Ok(Term(2)));
        assert_eq!(log.term(LogIndex(5)), Err(StorageError::Compacted));
        assert_eq!(log.term(LogIndex(11)), Err(StorageError::Unavailable));
        assert_eq!(
            log.entries(LogIndex(6), LogIndex(8), 100),
            Err(StorageError::Compacted)
        );
        let all = log.entries(LogIndex(7), LogIndex(11), u64::MAX).unwrap();
        assert_eq!(all.len(), 4);
        let limited = log.entries(LogIndex(7), LogIndex(11), 15).unwrap();
        assert_eq!(limited.len(), 1, "at least one, then the byte limit");
        assert_eq!(
            log.entries(LogIndex(7), LogIndex(12), 100),
            Err(StorageError::Unavailable)
        );
        assert_eq!(log.first_needed_lsn(LogIndex(8)), Some(9));
        assert_eq!(log.first_needed_lsn(LogIndex(10)), None);
    }

    #[test]
    fn the_same_entry_again_keeps_what_follows_and_live_bytes_follow_the_applied_index() {
        let mut log = CopysetLog::default();
        for i in 1..=5 {
            log.take(&entry(i, 1), i * 100).unwrap();
        }
        let record = entry_record_len(&Entry {
            term: Term(1),
            index: LogIndex(1),
            kind: EntryKind::Normal,
            data: vec![0; 10].into(),
        });
        assert_eq!(log.live_bytes(), 5 * record);
        // Entry 2 written again (same term): only its position changes.
        log.take(&entry(2, 1), 900).unwrap();
        assert_eq!(log.last(), LogIndex(5));
        assert_eq!(log.first_needed_lsn(LogIndex(0)), Some(100));
        assert_eq!(
            log.first_needed_lsn(LogIndex(1)),
            Some(300),
            "lowest, not first"
        );
        log.applied = LogIndex(3);
        assert_eq!(log.live_bytes(), 2 * record);
        assert_eq!(
            log.live_entries()
                .iter()
                .map(|e| e.index.0)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );
        // Another term at index 4 truncates.
        log.take(&entry(4, 2), 1000).unwrap();
        assert_eq!(log.last(), LogIndex(4));
        assert_eq!(log.live_bytes(), record);
        log.applied = LogIndex(4);
        assert_eq!(log.live_bytes(), 0);
        log.compact(LogIndex(4));
        assert_eq!(log.live_bytes(), 0);
        assert_eq!(log.first_needed_lsn(LogIndex(4)), None);
    }

    #[test]
    fn a_snapshot_keeps_only_the_entries_that_agree_with_it() {
        let mut log = CopysetLog::default();
        for i in 1..=6 {
            log.take(&entry(i, 1), i).unwrap();
        }
        log.install_snapshot(SnapshotMeta {
            index: LogIndex(4),
            term: Term(1),
            conf_state: ConfState::default(),
        });
        assert_eq!(log.first_index(), Ok(LogIndex(5)));
        assert_eq!(log.last_index(), Ok(LogIndex(6)));
        log.install_snapshot(SnapshotMeta {
            index: LogIndex(8),
            term: Term(3),
            conf_state: ConfState::default(),
        });
        assert_eq!(log.last_index(), Ok(LogIndex(8)));
        assert_eq!(log.term(LogIndex(8)), Ok(Term(3)));
        assert_eq!(log.applied, LogIndex(8));
    }
}
