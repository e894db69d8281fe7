//! Identifiers that cross module boundaries, as newtypes so they cannot be mixed up.

use std::fmt;

macro_rules! id {
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

id!(
    /// A chunk's cluster-wide id.
    ChunkId
);
id!(
    /// A copyset (one raft group and the chunks it owns), cluster-wide.
    CopysetId
);
