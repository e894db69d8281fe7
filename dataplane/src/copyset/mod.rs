//! Copysets: one raft group per copyset, coupling a raftcore node with the shard's WAL (its
//! log) and chunk store (its state machine).
//!
//! - `op`: the chunk operations the log carries, encoded once (the client's request body).
//! - `core`: the copyset's logic as a pure state machine that emits commands for the shell.

pub mod core;
pub mod op;

#[cfg(test)]
mod sim_tests;

pub use self::core::{Action, CopysetCore, Refusal, Token};
pub use self::op::{ChunkOp, OpDecodeError};
