//! Bindings to C libraries and the thin safe wrappers above them. Every `unsafe` block that
//! touches C lives in this crate, each with a `// SAFETY:` line.
//!
//! - `numa`: binding a thread's memory to a NUMA node.
//! - `signals`: the default `SIGPIPE` action for command-line tools.
//! - `verbs` (feature `rdma`): ibverbs through rdma-sys.
//! - `spdk` (feature `spdk`): SPDK through bindgen.

pub mod numa;
pub mod signals;
#[cfg(feature = "spdk")]
pub mod spdk;
#[cfg(feature = "rdma")]
pub mod verbs;
