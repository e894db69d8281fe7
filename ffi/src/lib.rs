//! Bindings to C libraries and the thin safe wrappers above them. Every `unsafe` block that
//! touches C lives in this crate, each with a `// SAFETY:` line.
//!
//! - `verbs` (feature `rdma`): ibverbs through rdma-sys.
//! - `spdk` (feature `spdk`): SPDK through bindgen.

#[cfg(feature = "rdma")]
pub mod verbs;
