//! The raft log as raft sees it: what storage holds (persisted) followed by what is not yet
//! persisted (the unstable tail, and possibly a received snapshot), with the commit and apply
//! points.

use crate::storage::{LogStorage, StorageError};
use crate::types::{Entry, LogIndex, Snapshot, Term};

/// The log of one peer.
#[derive(Debug)]
pub struct RaftLog<S: LogStorage> {
    /// What is persisted.
    pub storage: S,
    /// A snapshot received from the leader and not yet persisted.
    unstable_snapshot: Option<Snapshot>,
    /// Whether `unstable_snapshot` was handed to the driver.
    snapshot_handed: bool,
    /// Entries not yet persisted. Invariant: `unstable[i].index == offset + i`.
    unstable: Vec<Entry>,
    /// Index of `unstable[0]`; everything below it is in storage (or the snapshot).
    offset: LogIndex,
    /// `unstable[..handed]` have been handed to the driver to persist.
    /// Invariant: `handed <= unstable.len()`.
    handed: usize,
    /// Highest index known committed. Invariant: `applied <= applying <= committed`.
    pub committed: LogIndex,
    /// Highest index known persisted with the terms this log has.
    pub persisted: LogIndex,
    /// Highest index handed to the driver for applying.
    pub applying: LogIndex,
    /// Highest index the state machine has applied.
    pub applied: LogIndex,
    /// Storage answered `TemporarilyUnavailable` for entries to apply: wait for the driver's
    /// fetch report instead of asking again at every ready.
    apply_fetch_pending: bool,
}

/// The unpersisted part of the log that a `Ready` hands out.
pub struct Unpersisted {
    /// A snapshot to install first.
    pub snapshot: Option<Snapshot>,
    /// Entries to append after it.
    pub entries: Vec<Entry>,
}

impl<S: LogStorage> RaftLog<S> {
    /// The log over `storage`, with `applied` as the state machine's position.
    pub fn new(storage: S, committed: LogIndex, applied: LogIndex) -> Result<Self, StorageError> {
        let first = storage.first_index()?;
        let last = storage.last_index()?;
        let snapshot_index = LogIndex(first.0 - 1);
        let committed = committed.max(snapshot_index).min(last);
        let applied = applied.max(snapshot_index).min(committed);
        Ok(RaftLog {
            storage,
            unstable_snapshot: None,
            snapshot_handed: false,
            unstable: Vec::new(),
            offset: last.next(),
            handed: 0,
            committed,
            persisted: last,
            applying: applied,
            applied,
            apply_fetch_pending: false,
        })
    }

    /// The first index still in the log.
    pub fn first_index(&self) -> LogIndex {
        match &self.unstable_snapshot {
            Some(snapshot) => snapshot.meta.index.next(),
            None => self.storage.first_index().unwrap_or(self.offset),
        }
    }

    /// The last index in the log.
    pub fn last_index(&self) -> LogIndex {
        if let Some(last) = self.unstable.last() {
            return last.index;
        }
        if let Some(snapshot) = &self.unstable_snapshot {
            return snapshot.meta.index;
        }
        LogIndex(self.offset.0 - 1)
    }

    /// The term of the last entry.
    pub fn last_term(&self) -> Term {
        self.term(self.last_index()).unwrap_or(Term(0))
    }

    /// The term of the entry at `index`.
    pub fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        if let Some(snapshot) = &self.unstable_snapshot {
            if index == snapshot.meta.index {
                return Ok(snapshot.meta.term);
            }
            if index < snapshot.meta.index {
                return Err(StorageError::Compacted);
            }
        }
        if index >= self.offset {
            return self
                .unstable
                .get((index.0 - self.offset.0) as usize)
                .map(|e| e.term)
                .ok_or(StorageError::Unavailable);
        }
        if index.0 == 0 {
            return Ok(Term(0));
        }
        self.storage.term(index)
    }

    /// Whether the entry at `index` has `term`.
    pub fn match_term(&self, index: LogIndex, term: Term) -> bool {
        self.term(index).map(|t| t == term).unwrap_or(false)
    }

    /// Whether a log ending at `(last_index, last_term)` is at least as up to date as this one
    /// (raft paper §5.4.1).
    pub fn is_up_to_date(&self, last_index: LogIndex, last_term: Term) -> bool {
        let my_term = self.last_term();
        last_term > my_term || (last_term == my_term && last_index >= self.last_index())
    }

    /// The first entry of `entries` whose term differs from the log's, or that is new; 0 when
    /// every entry is already present.
    fn find_conflict(&self, entries: &[Entry]) -> LogIndex {
        for entry in entries {
            if !self.match_term(entry.index, entry.term) {
                return entry.index;
            }
        }
        LogIndex(0)
    }

    /// The largest index at or below `index` whose term is at or below `term` (or the first
    /// index we cannot read): where a leader and a follower can next hope to agree.
    pub fn find_conflict_by_term(&self, index: LogIndex, term: Term) -> LogIndex {
        let mut index = index.min(self.last_index());
        while index.0 > 0 {
            match self.term(index) {
                Ok(t) if t > term => index = LogIndex(index.0 - 1),
                _ => break,
            }
        }
        index
    }

    /// Appends `entries` after `(prev_index, prev_term)` if the log matches there, moving the
    /// commit point to `min(commit, last new index)`. Returns the last new index, or `None`
    /// when the log does not match (or the entries would overwrite a committed one, which a
    /// correct leader never asks).
    pub fn maybe_append(
        &mut self,
        prev_index: LogIndex,
        prev_term: Term,
        commit: LogIndex,
        entries: &[Entry],
    ) -> Option<LogIndex> {
        if !self.match_term(prev_index, prev_term) {
            return None;
        }
        let last_new = LogIndex(prev_index.0 + entries.len() as u64);
        let conflict = self.find_conflict(entries);
        if conflict.0 != 0 {
            if conflict <= self.committed {
                return None;
            }
            let skip = (conflict.0 - prev_index.0 - 1) as usize;
            self.append(&entries[skip..]);
        }
        self.commit_to(commit.min(last_new));
        Some(last_new)
    }

    /// Appends entries to the unstable tail, overwriting whatever follows their first index.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let after = first.index;
        assert!(
            after > self.committed,
            "append would overwrite committed entry {after}"
        );
        let end = LogIndex(self.offset.0 + self.unstable.len() as u64);
        if after == end {
            self.unstable.extend_from_slice(entries);
        } else if after <= self.offset {
            // The new entries replace part of what storage holds: storage truncates when the
            // driver appends them.
            self.offset = after;
            self.unstable = entries.to_vec();
            self.handed = 0;
        } else {
            let keep = (after.0 - self.offset.0) as usize;
            self.unstable.truncate(keep);
            self.handed = self.handed.min(keep);
            self.unstable.extend_from_slice(entries);
        }
        if self.persisted >= after {
            self.persisted = LogIndex(after.0 - 1);
        }
    }

    /// Entries in `[low, high)`, at most `max_bytes` of payload (at least one entry).
    pub fn entries(
        &self,
        low: LogIndex,
        high: LogIndex,
        max_bytes: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        if low >= high {
            return Ok(Vec::new());
        }
        if low < self.first_index() {
            return Err(StorageError::Compacted);
        }
        if high > self.last_index().next() {
            return Err(StorageError::Unavailable);
        }
        let mut out = Vec::new();
        let mut bytes = 0u64;
        if low < self.offset {
            let stored_high = high.min(self.offset);
            out = self.storage.entries(low, stored_high, max_bytes)?;
            bytes = out.iter().map(|e| e.data.len() as u64).sum();
            if (out.len() as u64) < stored_high.0 - low.0 {
                return Ok(out);
            }
        }
        let from = low.max(self.offset);
        for index in from.0..high.0 {
            let entry = &self.unstable[(index - self.offset.0) as usize];
            bytes += entry.data.len() as u64;
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    /// Moves the commit point forward (never back).
    pub fn commit_to(&mut self, index: LogIndex) {
        if index > self.committed {
            assert!(
                index <= self.last_index(),
                "commit {index} beyond the last index"
            );
            self.committed = index;
        }
    }

    /// Commits `index` if it is in `term` (a leader commits only entries of its own term by
    /// counting replicas, raft paper §5.4.2). Returns whether the commit point moved.
    pub fn maybe_commit(&mut self, index: LogIndex, term: Term) -> bool {
        if index > self.committed && self.term(index).map(|t| t == term).unwrap_or(false) {
            self.commit_to(index);
            true
        } else {
            false
        }
    }

    /// Whether there are unpersisted entries or a snapshot not yet handed out.
    pub fn has_unhanded(&self) -> bool {
        self.handed < self.unstable.len()
            || (self.unstable_snapshot.is_some() && !self.snapshot_handed)
    }

    /// Hands out what must be persisted next and marks it handed.
    pub fn take_unhanded(&mut self) -> Unpersisted {
        let snapshot = match (&self.unstable_snapshot, self.snapshot_handed) {
            (Some(snapshot), false) => Some(snapshot.clone()),
            _ => None,
        };
        self.snapshot_handed = true;
        let entries = self.unstable[self.handed..].to_vec();
        self.handed = self.unstable.len();
        Unpersisted { snapshot, entries }
    }

    /// Storage now holds the entries up to `index` written with `term`. Ignored when the
    /// entry at `index` was overwritten since (a newer write will report it).
    pub fn stable_to(&mut self, index: LogIndex, term: Term) {
        if index < self.offset {
            return;
        }
        let Some(entry) = self.unstable.get((index.0 - self.offset.0) as usize) else {
            return;
        };
        if entry.term != term {
            return;
        }
        let count = (index.0 - self.offset.0 + 1) as usize;
        self.unstable.drain(..count);
        self.handed = self.handed.saturating_sub(count);
        self.offset = index.next();
        self.persisted = self.persisted.max(index);
    }

    /// Storage and the state machine now hold the snapshot at `index`.
    pub fn stable_snapshot_to(&mut self, index: LogIndex) {
        if let Some(snapshot) = &self.unstable_snapshot {
            if snapshot.meta.index == index {
                self.unstable_snapshot = None;
                self.snapshot_handed = false;
                self.persisted = self.persisted.max(index);
                self.applying = self.applying.max(index);
                self.applied = self.applied.max(index);
            }
        }
    }

    /// Replaces the log by a snapshot received from the leader.
    pub fn restore(&mut self, snapshot: Snapshot) {
        let index = snapshot.meta.index;
        assert!(
            index > self.committed,
            "restore of snapshot {index} at or below the commit"
        );
        self.committed = index;
        self.offset = index.next();
        self.unstable.clear();
        self.handed = 0;
        self.unstable_snapshot = Some(snapshot);
        self.snapshot_handed = false;
        self.persisted = self.persisted.min(LogIndex(index.0 - 1));
    }

    /// Whether committed entries wait to be handed for applying.
    pub fn has_next_committed(&self) -> bool {
        !self.apply_fetch_pending
            && self.unstable_snapshot.is_none()
            && self.committed.min(self.persisted) > self.applying
    }

    /// The driver fetched entries storage could not produce before.
    pub fn on_entries_fetched(&mut self) {
        self.apply_fetch_pending = false;
    }

    /// Committed, persisted entries not yet handed for applying, up to `max_bytes`; marks them
    /// handed. Entries storage cannot produce right now are retried on the next call.
    pub fn take_next_committed(&mut self, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        if !self.has_next_committed() {
            return Ok(Vec::new());
        }
        let high = self.committed.min(self.persisted).next();
        let entries = match self.entries(self.applying.next(), high, max_bytes) {
            Ok(entries) => entries,
            Err(StorageError::TemporarilyUnavailable) => {
                self.apply_fetch_pending = true;
                return Ok(Vec::new());
            }
            Err(other) => return Err(other),
        };
        if let Some(last) = entries.last() {
            self.applying = last.index;
        }
        Ok(entries)
    }

    /// The state machine applied up to `index`.
    pub fn applied_to(&mut self, index: LogIndex) {
        let index = index.min(self.applying);
        if index > self.applied {
            self.applied = index;
        }
    }
}
