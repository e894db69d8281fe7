//! Raft as a pure state machine, in the style of raft-rs and etcd/raft: time comes in as
//! `tick()`, messages as `step()`, and everything to do goes out through `ready()`.
//! Nothing here touches a clock, a socket, a thread or a disk.
#![warn(missing_docs)]

pub mod storage;
pub mod types;

pub use storage::{LogStorage, StorageError};
pub use types::{ConfState, Entry, EntryKind, HardState, LogIndex, NodeId, SnapshotMeta, Term};
