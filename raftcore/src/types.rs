//! The vocabulary shared by raftcore and whoever drives it: ids, log entries, persisted state.

use std::collections::BTreeSet;
use std::fmt;

use bytes::Bytes;

macro_rules! newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

newtype!(
    /// A raft term.
    Term
);
newtype!(
    /// A position in the raft log; the first entry is at 1, 0 means "none".
    LogIndex
);
newtype!(
    /// A raft peer: one replica of one group. Unique within the group, never 0.
    NodeId
);

impl LogIndex {
    /// The next index.
    pub fn next(self) -> LogIndex {
        LogIndex(self.0 + 1)
    }
}

/// What an entry carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Application data for the state machine.
    Normal,
    /// A configuration change (encoded `ConfChange` in `data`).
    ConfChange,
}

/// One log entry. `data` is shared, not copied: the chunkserver proposes the payload buffer it
/// received and the same buffer reaches the WAL and the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Term in which the entry was proposed.
    pub term: Term,
    /// Its position in the log.
    pub index: LogIndex,
    /// What it carries.
    pub kind: EntryKind,
    /// Its payload.
    pub data: Bytes,
}

/// State that must be persisted before messages that depend on it are sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HardState {
    /// Current term.
    pub term: Term,
    /// Whom this peer voted for in `term` (none: `None`).
    pub vote: Option<NodeId>,
    /// Highest index known committed.
    pub commit: LogIndex,
}

/// A group's membership. In a joint configuration `voters_outgoing` is non-empty and decisions
/// need a majority of both `voters` and `voters_outgoing`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfState {
    /// Voters of the (incoming) configuration.
    pub voters: BTreeSet<NodeId>,
    /// Voters of the outgoing configuration while joint; empty otherwise.
    pub voters_outgoing: BTreeSet<NodeId>,
    /// Non-voting members that receive the log.
    pub learners: BTreeSet<NodeId>,
    /// Learners that become voters when the joint configuration is left.
    pub learners_next: BTreeSet<NodeId>,
    /// Whether leaving the joint configuration happens automatically.
    pub auto_leave: bool,
}

/// What a snapshot covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Last index the snapshot includes.
    pub index: LogIndex,
    /// Term of that entry.
    pub term: Term,
    /// Membership as of `index`.
    pub conf_state: ConfState,
}

/// A whole snapshot: what it covers and the state machine's serialized state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// What the snapshot covers.
    pub meta: SnapshotMeta,
    /// The state machine's image, as the state machine wrote it.
    pub data: Bytes,
}

impl ConfState {
    /// Every voter of the incoming and the outgoing configuration.
    pub fn all_voters(&self) -> BTreeSet<NodeId> {
        self.voters.union(&self.voters_outgoing).copied().collect()
    }

    /// Every member: voters of both halves, learners and learners to be.
    pub fn all_members(&self) -> BTreeSet<NodeId> {
        let mut all = self.all_voters();
        all.extend(self.learners.iter().copied());
        all.extend(self.learners_next.iter().copied());
        all
    }

    /// Whether the configuration is joint (a change of several voters is under way).
    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }
}
