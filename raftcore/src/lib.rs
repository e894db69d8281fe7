//! Raft as a pure state machine, in the style of raft-rs and etcd/raft: time comes in as
//! `tick()`, messages as `step()`, and everything to do goes out through `ready()`.
//! Nothing here touches a clock, a socket, a thread or a disk; the random source of election
//! timeouts is seeded by the configuration, so a run replays exactly.
//!
//! Start at [`RawNode`]: its module documentation describes the ready/advance cycle.
#![warn(missing_docs)]

pub mod codec;
pub mod conf_change;
pub mod log;
pub mod message;
pub mod progress;
pub mod quorum;
pub mod raft;
pub mod raw_node;
pub mod storage;
pub mod types;

pub use codec::{decode, encode, encode_to_bytes, DecodeError};
pub use conf_change::{ConfChange, ConfChangeError, ConfChangeStep, ConfChangeTransition};
pub use message::{Message, MessageType, SnapshotChunk};
pub use raft::{Config, InjectedBug, Raft, RaftError, ReadState, StateRole};
pub use raw_node::{RawNode, Ready, SoftState};
pub use storage::{LogStorage, MemStorage, SnapshotPiece, StorageError};
pub use types::{
    ConfState, Entry, EntryKind, HardState, LogIndex, NodeId, Snapshot, SnapshotMeta, Term,
};
