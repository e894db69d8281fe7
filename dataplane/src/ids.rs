//! Identifiers that cross module boundaries, as newtypes so they cannot be mixed up. A leaf
//! module: the wire protocol, the storage layout and the copysets all name them from here.
//! Their widths are fixed by the formats that carry them (u64 in the WAL record header, the
//! chunk table and the frame header).

/// A chunk's cluster-wide id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub u64);

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A copyset (a raft group).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CopysetId(pub u64);

impl std::fmt::Display for CopysetId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
