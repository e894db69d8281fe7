//! Identifiers that cross module boundaries, as newtypes so they cannot be mixed up. Each is
//! defined next to the on-disk or wire format that fixes its width and re-exported here, so
//! the rest of the dataplane names them in one place.

pub use crate::storage::table::ChunkId;
pub use crate::storage::wal::record::CopysetId;
